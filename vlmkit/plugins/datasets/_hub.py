"""Shared loader for caption datasets on the Hugging Face Hub (``flickr30k``, ``coco``).

A hub dataset is read with ``datasets.load_dataset`` (or ``load_from_disk`` for a saved local
copy), then turned into ``CaptionExample`` s whose images decode lazily from the Arrow files. What
differs between hubs datasets is data: a ``HubSource`` names the dataset id and its columns, and
any column can be overridden by an option, so a mirror with other column names still loads.

Splits: when the data carries its own split (a ``split`` column such as Karpathy's, or hub splits
named train/validation/test) and it covers all three, that split is used, so results compare
with published ones; otherwise each image's split comes from a seeded hash of its id. Rows that
share an id (one row per caption) become one example with all their captions.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from vlmkit.core.contracts import SPLITS, CaptionExample, DatasetSpec
from vlmkit.core.errors import DataError
from vlmkit.sdk.datasets import (
    DEFAULT_FRACTIONS,
    DataWarning,
    ListDataset,
    SplitFractions,
    assign_split,
    captions_of,
    check_split,
    fingerprint,
    parse_options,
    unit_hash,
)

FORMAT_VERSION = 1

#: upstream split names (hub splits or values of a split column) -> vlmkit split
SPLIT_NAMES = {
    "train": "train",
    "restval": "train",  # Karpathy's "rest of val", conventionally trained on
    "val": "validation",
    "valid": "validation",
    "validation": "validation",
    "dev": "validation",
    "test": "test",
}
CAPTION_COLUMNS = ("alt_text", "caption", "captions", "sentences", "text", "raw")
ID_COLUMNS = ("img_id", "image_id", "cocoid", "imgid", "id", "filename", "file_name")
SPLIT_COLUMNS = ("split",)
FILE_COLUMNS = ("file_name", "filename", "image_path", "path")
URL_COLUMNS = ("url", "coco_url", "image_url", "flickr_url")


@dataclass(frozen=True)
class HubSource:
    """One hub dataset and the columns vlmkit reads from it (``None``: detect)."""

    dataset_id: str
    revision: str | None = None
    captions_column: str | None = None
    id_column: str | None = None
    split_column: str | None = None
    image_column: str | None = None


class HubOptions(BaseModel):
    """Options shared by the hub caption datasets (``flickr30k``, ``coco``)."""

    model_config = ConfigDict(extra="forbid")

    captions: Literal["original", "alt-text"] = Field(
        "original", description="original human captions, or alt-text: GPT-4o rewrites for alt text (Mozilla)"
    )
    dataset_id: str | None = Field(None, description="read this hub dataset id instead of the default")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit) to pin")
    path: str | None = Field(
        None,
        description="a local copy: a save_to_disk folder, or a folder load_dataset reads (a clone of "
        "the hub repository, parquet files, an imagefolder)",
    )
    image_root: str | None = Field(
        None,
        description="folder of image files, for datasets that name files instead of holding images "
        "(COCO Karpathy: <image_root>/<filepath>/<filename>)",
    )
    image_column: str | None = Field(None, description="column of images, paths or URLs (default: detected)")
    captions_column: str | None = Field(None, description="column of the caption(s) (default: detected)")
    id_column: str | None = Field(None, description="column of a stable image id (default: detected)")
    split_column: str | None = Field(None, description="column of upstream split names (default: 'split')")
    splits: Literal["auto", "hash"] = Field(
        "auto",
        description="auto: the data's own split when it has train, validation and test; hash: a seeded "
        "hash of the image id (then seed and split_fractions apply)",
    )
    split_fractions: SplitFractions = Field(DEFAULT_FRACTIONS, description="train/validation/test for hash")
    limit: int | None = Field(
        None, ge=1, description="keep at most this many examples (a stable seeded subset)"
    )


class HubCaptionDataset(DatasetSpec):
    """Base of the hub caption datasets; subclasses set ``name``, ``sources`` and descriptions."""

    options: ClassVar[type[BaseModel]] = HubOptions
    #: ``captions`` option value -> where those captions live
    sources: ClassVar[Mapping[str, HubSource]] = {}

    def load(self, split: str, options: Mapping[str, Any] | None = None, *, seed: int = 0) -> ListDataset:
        opts: HubOptions = parse_options(self, options)
        return load_hub_split(self.name, self.sources[opts.captions], opts, split, seed)


# --------------------------------------------------------------------------------------- loading


def load_hub_split(name: str, source: HubSource, opts: HubOptions, split: str, seed: int) -> ListDataset:
    dataset_id = opts.dataset_id or source.dataset_id
    revision = opts.revision or (None if opts.dataset_id else source.revision)
    where = f"dataset {name!r} ({opts.path or dataset_id})"
    check_split(split, where)
    parts = _load_raw(dataset_id, revision, opts.path, _stamp(opts.path), where)
    first = next(iter(parts.values()))
    columns = list(first.column_names)

    def pick(option: str | None, default: str | None, candidates: tuple[str, ...], what: str) -> str | None:
        if option is not None:
            if option not in columns:
                raise DataError(f"{where}: no column {option!r} ({what}); columns: {', '.join(columns)}")
            return option
        if default in columns:
            return default
        return next((c for c in candidates if c in columns), None)

    captions_col = pick(opts.captions_column, source.captions_column, CAPTION_COLUMNS, "captions")
    if captions_col is None:
        raise DataError(
            f"{where}: no captions column found; pass captions_column=, columns: {', '.join(columns)}"
        )
    id_col = pick(opts.id_column, source.id_column, ID_COLUMNS, "image id")
    split_col = pick(opts.split_column, source.split_column, SPLIT_COLUMNS, "split")
    image = _image_source(first, opts, source, columns, where)

    # one record per image id, whatever the number of rows (one per caption in some datasets)
    records: dict[str, _Record] = {}
    positional = id_col is None
    for part_name, ds in parts.items():
        wanted = [c for c in dict.fromkeys([captions_col, id_col, split_col, *image.read_columns]) if c]
        table = ds.select_columns(wanted).to_dict()
        ids = table[id_col] if id_col else _image_paths(ds, image.column) if image.kind == "arrow" else None
        if ids is None or any(i in (None, "") for i in ids):
            ids, positional = [f"{part_name}:{row}" for row in range(len(ds))], True
        for row, identity in enumerate(ids):
            captions = captions_of(table[captions_col][row])
            record = records.get(str(identity))
            if record is None:
                label = table[split_col][row] if split_col else part_name
                cells = {c: table[c][row] for c in image.read_columns}
                records[str(identity)] = _Record(str(identity), part_name, row, captions, str(label), cells)
            else:
                record.captions.extend(c for c in captions if c not in record.captions)
    if positional:
        warnings.warn(
            f"{where}: no image id column; identifying images by their row (pin revision=, or pass id_column=)",
            DataWarning,
            stacklevel=3,
        )

    labels = {SPLIT_NAMES.get(r.label.lower()) for r in records.values()}
    use_upstream = opts.splits == "auto" and set(SPLITS) <= labels

    def split_of(record: _Record) -> str | None:
        if use_upstream:
            return SPLIT_NAMES.get(record.label.lower())
        return assign_split(record.id, seed, opts.split_fractions)

    chosen = [r for r in records.values() if r.captions and split_of(r) == split]
    if opts.limit is not None and len(chosen) > opts.limit:
        chosen = sorted(chosen, key=lambda r: unit_hash(r.id, seed))[: opts.limit]
    chosen.sort(key=lambda r: r.id)
    if not chosen:
        raise DataError(f"{where}: split {split!r} is empty ({len(records)} images in all)")

    examples = [
        CaptionExample(id=r.id, captions=r.captions, image=image.make(parts[r.part], r.row, r.cells))
        for r in chosen
    ]
    fp = fingerprint(
        name,
        FORMAT_VERSION,
        opts.path or dataset_id,
        revision,
        {k: getattr(v, "_fingerprint", None) for k, v in parts.items()},
        image.describe(),
        split,
        "upstream" if use_upstream else [seed, list(opts.split_fractions)],
        [r.id for r in chosen],
    )
    info = {"split": split, "source": opts.path or dataset_id, "upstream_splits": use_upstream}
    return ListDataset(examples, fp, name=name, info=info)


def _stamp(path: str | None) -> tuple:
    """Sizes and times of a local copy's files, so a rewritten copy is not served from the cache."""
    if path is None:
        return ()
    root = Path(path).expanduser()
    if not root.is_dir():
        return ()
    files = [p for pattern in ("*", "*/*") for p in root.glob(pattern) if p.is_file()][:10_000]
    return tuple(sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))


@dataclass
class _Record:
    """One image of a hub dataset: where its row is, its captions and its upstream split."""

    id: str
    part: str
    row: int
    captions: list[str]
    label: str
    cells: dict[str, Any]


@functools.lru_cache(maxsize=4)
def _load_raw(
    dataset_id: str, revision: str | None, path: str | None, stamp: tuple, where: str
) -> dict[str, Any]:
    """``upstream split name -> datasets.Dataset``; cached, so train, validation and test load once.

    ``stamp`` only keys the cache.
    """
    import datasets

    try:
        if path is not None:
            local = Path(path).expanduser()
            if not local.exists():
                raise DataError(f"{where}: local copy {local} does not exist")
            if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
                raw = datasets.load_from_disk(str(local))
            else:
                raw = datasets.load_dataset(str(local))
        else:
            raw = datasets.load_dataset(dataset_id, revision=revision)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, bad files: one clear line
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        hint = (
            "check the path"
            if path
            else f"check the id, or download it where the hub is reachable (datasets.load_dataset({dataset_id!r})"
            ".save_to_disk(DIR)) and pass path=DIR"
        )
        raise DataError(f"{where}: cannot load ({reason}); {hint}") from exc
    if isinstance(raw, (datasets.IterableDataset, datasets.IterableDatasetDict)):
        raise DataError(f"{where}: streaming datasets are not supported; load it without streaming")
    parts = dict(raw) if isinstance(raw, datasets.DatasetDict) else {"all": raw}
    parts = {k: v for k, v in parts.items() if len(v)}
    if not parts:
        raise DataError(f"{where}: the dataset has no rows")
    return parts


def _image_paths(ds: Any, column: str) -> list[str] | None:
    """The file names stored inside an Image column (without reading the image bytes)."""
    import pyarrow.compute as pc

    table = ds.select_columns([column]).with_format("arrow")[:]
    col = table.column(column)
    try:
        paths = pc.struct_field(col.combine_chunks(), "path").to_pylist()
    except Exception:  # noqa: BLE001 - not a struct column: no stored file names
        return None
    return paths if all(paths) else None


# --------------------------------------------------------------------------------------- images


@dataclass(frozen=True)
class _ImageSource:
    kind: Literal["arrow", "file", "url"]
    column: str
    read_columns: tuple[str, ...] = ()
    root: str | None = None

    def make(self, ds: Any, row: int, cells: dict[str, Any]) -> Any:
        if self.kind == "arrow":
            return RowImage(ds, row, self.column)
        if self.kind == "url":
            return UrlImage(str(cells[self.column]))
        parts = [str(cells[c]) for c in self.read_columns]
        return str(Path(self.root or ".", *parts))

    def describe(self) -> list[Any]:
        return [self.kind, self.column, list(self.read_columns), self.root]


def _image_source(
    ds: Any, opts: HubOptions, source: HubSource, columns: list[str], where: str
) -> _ImageSource:
    from datasets import Image

    def is_image(col: str) -> bool:
        return isinstance(ds.features.get(col), Image)

    column = opts.image_column
    if column is not None and column not in columns:
        raise DataError(f"{where}: no image column {column!r}; columns: {', '.join(columns)}")
    if column is None and source.image_column in columns:
        column = source.image_column
    if column is None:
        column = next((c for c in columns if is_image(c)), None)
    if column is not None and is_image(column):
        return _ImageSource("arrow", column)
    root = opts.image_root or opts.path
    if opts.image_root is not None:
        if column is None and {"filepath", "filename"} <= set(columns):  # COCO Karpathy layout
            return _ImageSource("file", "filename", ("filepath", "filename"), opts.image_root)
        column = column or next((c for c in FILE_COLUMNS if c in columns), None)
        if column is not None:
            return _ImageSource("file", column, (column,), root)
    column = column or next((c for c in URL_COLUMNS if c in columns), None)
    if column is not None:
        sample = str(ds[0][column])
        if sample.startswith(("http://", "https://")):
            return _ImageSource("url", column, (column,))
        return _ImageSource("file", column, (column,), root)
    raise DataError(
        f"{where}: no images: no image column and no image_root to find files in; pass image_column= "
        f"or image_root=; columns: {', '.join(columns)}"
    )


class RowImage:
    """Decodes one row's image from the Arrow files on demand (picklable)."""

    def __init__(self, dataset: Any, row: int, column: str) -> None:
        self.dataset, self.row, self.column = dataset, row, column

    def __call__(self):
        from PIL import Image

        value = self.dataset[self.row][self.column]
        if isinstance(value, dict):  # an Image column stored with decode=False
            if value.get("bytes"):
                import io

                return Image.open(io.BytesIO(value["bytes"]))
            return Image.open(value["path"])
        return value


class UrlImage:
    """Downloads an image on first use (the feature cache makes that once per image)."""

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        self.url, self.timeout = url, timeout

    def __call__(self):
        import io
        import urllib.request

        from PIL import Image

        try:
            with urllib.request.urlopen(self.url, timeout=self.timeout) as response:  # noqa: S310
                data = response.read()
        except OSError as exc:
            raise DataError(
                f"cannot download image {self.url} ({exc}); pass image_root= to read local files instead"
            ) from exc
        return Image.open(io.BytesIO(data))
