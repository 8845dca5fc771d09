"""Shared loader for caption datasets on the Hugging Face Hub (``flickr30k``, ``coco``).

A hub dataset's files are fetched with ``huggingface_hub.snapshot_download`` at a pinned revision
(or read from ``path=``, a local copy) and read shard by shard (``_shards``): shards whose
schemas disagree still load, each row's captions are normalised from a string or a list, and a
bad shard is one line naming it. Rows become ``CaptionExample`` s whose images decode lazily from
the Arrow files, come from local files (``image_root``), or are downloaded once into a folder
(``_download``). What differs between hub datasets is data: a ``HubSource`` names the dataset id,
its pinned revision and its columns, and any column can be overridden by an option, so a mirror
with other column names still loads.

Splits: a source can take each image's split from another dataset by image id (``splits_from``:
COCO's alt-text variant takes Karpathy's, so no mix of the two puts a Karpathy test or validation
image into training). Otherwise, when the data carries its own split (a ``split`` column such as
Karpathy's, or files named train/validation/test) covering all three, that split is used, so
results compare with published ones; else each image's split comes from a seeded hash of its id.
Rows that share an id (one row per caption) become one example with all their captions.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from vlmkit import SPLITS, CaptionExample, ConfigError, DataError, DatasetSpec
from vlmkit.plugins.datasets._shards import find_shards, open_shards
from vlmkit.sdk.datasets import (
    DEFAULT_FRACTIONS,
    DataWarning,
    ListDataset,
    SplitFractions,
    assign_split,
    captions_of,
    check_split,
    fingerprint,
    from_rank_zero,
    parse_options,
    unit_hash,
)

FORMAT_VERSION = 2

#: upstream split names (hub splits, file names or values of a split column) -> vlmkit split
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
    """One hub dataset, the revision it is pinned to and the columns vlmkit reads (``None``:
    detect). ``splits_from``: take each image's split from that dataset (by image id) instead."""

    dataset_id: str
    revision: str | None = None
    captions_column: str | None = None
    id_column: str | None = None
    split_column: str | None = None
    image_column: str | None = None
    splits_from: HubSource | None = None

    def download_hint(self, revision: str | None, option: str = "path") -> str:
        """How to make a local copy where the hub is reachable (works as written: ``load_dataset``
        fails on some of these, and on a script repository without the parquet revision)."""
        rev = f", revision={revision!r}" if revision else ""
        return (
            f"download it where the hub is reachable (huggingface_hub.snapshot_download({self.dataset_id!r}, "
            f"repo_type='dataset'{rev}, local_dir=DIR)) and pass {option}=DIR"
        )


class HubOptions(BaseModel):
    """Options shared by the hub caption datasets (``flickr30k``, ``coco``)."""

    model_config = ConfigDict(extra="forbid")

    captions: Literal["original", "alt-text"] = Field(
        "original", description="original human captions, or alt-text: GPT-4o rewrites for alt text (Mozilla)"
    )
    dataset_id: str | None = Field(None, description="read this hub dataset id instead of the default")
    revision: str | None = Field(
        None, description="hub revision (commit sha, branch or tag) instead of the pinned one"
    )
    path: str | None = Field(
        None,
        description="a local copy: a snapshot of the hub repository (its parquet or arrow files), a "
        "save_to_disk folder, or a folder load_dataset reads (parquet files, an imagefolder)",
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
    #: why ``splits=hash`` is refused (``None``: allowed)
    hash_splits_refused: ClassVar[str | None] = None

    def load(self, split: str, options: Mapping[str, Any] | None = None, *, seed: int = 0) -> ListDataset:
        opts: HubOptions = parse_options(self, options)
        if opts.splits == "hash" and self.hash_splits_refused:
            raise ConfigError(f"dataset {self.name!r}: splits=hash is refused: {self.hash_splits_refused}")
        return load_hub_split(self.name, self.sources[opts.captions], opts, split, seed)


# --------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class _Part:
    """One shard (or one split ``load_dataset`` read): its upstream split name and its rows."""

    split: str
    name: str
    data: Any


def load_hub_split(name: str, source: HubSource, opts: HubOptions, split: str, seed: int) -> ListDataset:
    dataset_id = opts.dataset_id or source.dataset_id
    revision = opts.revision or (None if opts.dataset_id else source.revision)
    where = f"dataset {name!r} ({opts.path or dataset_id})"
    check_split(split, where)
    hint = HubSource(dataset_id).download_hint(revision)
    parts = _load_raw(dataset_id, revision, opts.path, _stamp(opts.path), where, hint)
    columns = _Columns.pick(parts[0], source, opts, where)
    image = _image_source(parts[0].data, opts, source, columns.all, where)
    records, positional = _read_records(parts, columns, image, where)
    if positional:
        warnings.warn(
            f"{where}: no image id column; identifying images by their row (pin revision=, or pass id_column=)",
            DataWarning,
            stacklevel=3,
        )

    membership = _membership(source.splits_from, opts, name) if source.splits_from else None
    if membership is not None and not any(i in membership for i in records):
        raise DataError(
            f"{where}: none of its {len(records)} image ids ({columns.id}: {next(iter(records))!r}, ...) is in "
            f"the split source's ids ({next(iter(membership))!r}, ...); pass id_column= the COCO image id"
        )
    labels = {SPLIT_NAMES.get(r.label.lower()) for r in records.values()}
    use_upstream = membership is None and opts.splits == "auto" and set(SPLITS) <= labels

    def split_of(record: _Record) -> str | None:
        if membership is not None:  # images outside the other dataset's splits (COCO test2017) train
            return membership.get(record.id, "train")
        if use_upstream:
            return SPLIT_NAMES.get(record.label.lower())
        return assign_split(record.id, seed, opts.split_fractions)

    chosen = [r for r in records.values() if r.captions and split_of(r) == split]
    if opts.limit is not None and len(chosen) > opts.limit:
        chosen = sorted(chosen, key=lambda r: unit_hash(r.id, seed))[: opts.limit]
    chosen.sort(key=lambda r: r.id)
    if not chosen:
        raise DataError(f"{where}: split {split!r} is empty ({len(records)} images in all)")
    made, problems = image.make_all(chosen, parts, opts, dataset_id, where)
    examples = [
        CaptionExample(id=r.id, captions=r.captions, image=made[r.id]) for r in chosen if r.id in made
    ]

    splits_by = (
        f"{getattr(opts, 'karpathy_path', None) or f'{source.splits_from.dataset_id}@{source.splits_from.revision}'}"
        " by image id"
        if source.splits_from
        else "upstream"
        if use_upstream
        else [seed, list(opts.split_fractions)]
    )
    fp = fingerprint(
        name,
        FORMAT_VERSION,
        opts.path or dataset_id,
        revision,
        [[p.name, getattr(p.data, "_fingerprint", None)] for p in parts],
        _stamp(opts.path),
        image.describe(),
        split,
        splits_by,
        [e.id for e in examples],
    )
    info = {
        "split": split,
        "source": opts.path or dataset_id,
        "revision": None if opts.path else revision,
        "upstream_splits": use_upstream,
        "splits_from": splits_by if source.splits_from else None,
        "problems": problems,
    }
    return ListDataset(examples, fp, name=name, info=info)


@dataclass(frozen=True)
class _Columns:
    captions: str
    id: str | None
    split: str | None
    all: list[str]

    @staticmethod
    def pick(first: _Part, source: HubSource, opts: HubOptions, where: str) -> _Columns:
        columns = list(first.data.column_names)

        def pick(
            option: str | None, default: str | None, candidates: tuple[str, ...], what: str
        ) -> str | None:
            if option is not None:
                if option not in columns:
                    raise DataError(f"{where}: no column {option!r} ({what}); columns: {', '.join(columns)}")
                return option
            if default in columns:
                return default
            return next((c for c in candidates if c in columns), None)

        captions = pick(opts.captions_column, source.captions_column, CAPTION_COLUMNS, "captions")
        if captions is None:
            raise DataError(
                f"{where}: no captions column found; pass captions_column=, columns: {', '.join(columns)}"
            )
        ident = pick(opts.id_column, source.id_column, ID_COLUMNS, "image id")
        split = pick(opts.split_column, source.split_column, SPLIT_COLUMNS, "split")
        return _Columns(captions, ident, split, columns)


def _read_records(
    parts: tuple[_Part, ...], columns: _Columns, image: _ImageSource, where: str
) -> tuple[dict[str, _Record], bool]:
    """One record per image id, whatever the number of rows (one per caption in some datasets)
    or of shards; each shard is read on its own, so shards may differ in their other columns."""
    records: dict[str, _Record] = {}
    positional = columns.id is None
    wanted = [
        c for c in dict.fromkeys([columns.captions, columns.id, columns.split, *image.read_columns]) if c
    ]
    for index, part in enumerate(parts):
        missing = [c for c in wanted if c not in part.data.column_names]
        if missing:
            raise DataError(
                f"{where}: shard {part.name} has no column {missing[0]!r} (its columns: "
                f"{', '.join(part.data.column_names)}); download it again, or pass {missing[0]!r}'s column"
            )
        table = part.data.select_columns(wanted).to_dict()
        ids = table[columns.id] if columns.id else None
        if ids is None and image.kind == "arrow":
            ids = _image_paths(part.data, image.column)
        if ids is None or any(i in (None, "") for i in ids):
            ids, positional = [f"{part.name}:{row}" for row in range(len(part.data))], True
        for row, identity in enumerate(ids):
            captions = captions_of(table[columns.captions][row])
            record = records.get(str(identity))
            if record is None:
                label = table[columns.split][row] if columns.split else part.split
                cells = {c: table[c][row] for c in image.read_columns}
                records[str(identity)] = _Record(str(identity), index, row, captions, str(label), cells)
            else:
                record.captions.extend(c for c in captions if c not in record.captions)
    return records, positional


def _membership(source: HubSource, opts: HubOptions, name: str) -> dict[str, str]:
    """``image id -> vlmkit split`` from ``source`` (Karpathy's split of COCO); it must cover all
    three splits, or a test image could be taken for a training one."""
    path = getattr(opts, "karpathy_path", None)
    where = f"dataset {name!r}: the split source ({path or source.dataset_id})"
    hint = source.download_hint(source.revision, "karpathy_path")
    parts = _load_raw(source.dataset_id, source.revision, path, _stamp(path), where, hint)
    columns = _Columns.pick(parts[0], source, HubOptions(), where)
    if columns.id is None:
        raise DataError(
            f"{where}: no image id column ({source.id_column}); columns: {', '.join(columns.all)}"
        )
    out: dict[str, str] = {}
    for part in parts:
        table = part.data.select_columns([c for c in (columns.id, columns.split) if c]).to_dict()
        for row, identity in enumerate(table[columns.id]):
            label = table[columns.split][row] if columns.split else part.split
            out[str(identity)] = SPLIT_NAMES.get(str(label).lower(), "?")
    if not set(SPLITS) <= set(out.values()):
        raise DataError(
            f"{where}: holds only {sorted(set(out.values()))} images, not all of {', '.join(SPLITS)}"
        )
    return out


def _stamp(path: str | None) -> tuple:
    """Sizes and times of a local copy's files, so a rewritten copy is not served from the cache."""
    if path is None:
        return ()
    root = Path(path).expanduser()
    if not root.is_dir():
        return ()
    files = [p for pattern in ("*", "*/*", "*/*/*") for p in root.glob(pattern) if p.is_file()][:10_000]
    return tuple(sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))


@dataclass
class _Record:
    """One image of a hub dataset: where its row is, its captions and its upstream split."""

    id: str
    part: int
    row: int
    captions: list[str]
    label: str
    cells: dict[str, Any]


@functools.lru_cache(maxsize=4)
def _load_raw(
    dataset_id: str, revision: str | None, path: str | None, stamp: tuple, where: str, hint: str
) -> tuple[_Part, ...]:
    """The parts (shards) of a dataset; cached, so train, validation and test load once.
    ``stamp`` only keys the cache."""
    if path is not None:
        root = Path(path).expanduser()
        if not root.exists():
            raise DataError(f"{where}: local copy {root} does not exist")
    else:
        root = _snapshot(dataset_id, revision, where, hint)
    shards = find_shards(root, set(SPLIT_NAMES), where)
    if shards:
        parts = tuple(_Part(s.split, s.name, ds) for s, ds in open_shards(shards, where))
    else:  # no arrow/parquet files: an imagefolder, CSV or JSON copy that load_dataset reads
        parts = _load_folder(root, where)
    if not parts:
        raise DataError(f"{where}: the dataset has no rows")
    return parts


def _snapshot(dataset_id: str, revision: str | None, where: str, hint: str) -> Path:
    from huggingface_hub import snapshot_download

    try:  # the data files only: a repository may also hold a loading script or sample images
        folder = snapshot_download(
            dataset_id,
            repo_type="dataset",
            revision=revision,
            allow_patterns=["*.parquet", "*.arrow", "*.json"],
        )
    except Exception as exc:  # noqa: BLE001 - offline, unknown id or revision: one clear line
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        raise DataError(f"{where}: cannot download revision {revision or 'main'} ({reason}); {hint}") from exc
    return Path(folder)


def _load_folder(root: Path, where: str) -> tuple[_Part, ...]:
    import datasets

    try:
        from vlmkit.sdk.datasets import derived_data_dir

        raw = datasets.load_dataset(str(root), cache_dir=str(derived_data_dir("hf-datasets")))
    except Exception as exc:  # noqa: BLE001 - bad files: one clear line
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        raise DataError(f"{where}: cannot load ({reason}); check the path") from exc
    parts = dict(raw) if isinstance(raw, datasets.DatasetDict) else {"all": raw}
    return tuple(_Part(k, k, v) for k, v in parts.items() if len(v))


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

    def make_all(
        self, records: list[_Record], parts: tuple[_Part, ...], opts: HubOptions, dataset_id: str, where: str
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """``(id -> image, id -> why it is left out)``: URLs are downloaded here, once, so a
        failed download leaves one image out instead of stopping a run half-way."""
        if self.kind == "arrow":
            return {r.id: RowImage(parts[r.part].data, r.row, self.column) for r in records}, {}
        if self.kind == "file":
            return _files_inside(records, self.root or ".", self.read_columns, where)
        return _download_all(records, self.column, opts, dataset_id, where)

    def describe(self) -> list[Any]:
        return [self.kind, self.column, list(self.read_columns), self.root]


def _files_inside(
    records: list[_Record], root: str, columns: tuple[str, ...], where: str
) -> tuple[dict[str, Any], dict[str, str]]:
    """``(id -> file, id -> why it is left out)``: the files a path column names under ``root``;
    one that resolves outside it (``/etc/passwd``, ``../secret.png``, a symlink out) is not read."""
    base = os.path.realpath(root)
    files, outside = {}, {}
    for r in records:
        path = str(Path(root, *(str(r.cells[c]) for c in columns)))
        real = os.path.realpath(path)
        if real == base or real.startswith(base.rstrip(os.sep) + os.sep):
            files[r.id] = path
        else:
            outside[r.id] = f"{path} is outside {root} (not read)"
    if outside:
        first = min(outside)
        summary = f"{len(outside)} of {len(records)} images are outside {root} (first: {outside[first]})"
        if not files:
            raise DataError(f"{where}: {summary}; point image_root= at the folder that holds them")
        warnings.warn(f"{where}: {summary}; they are left out", DataWarning, stacklevel=4)
    return files, outside


def _download_all(
    records: list[_Record], column: str, opts: HubOptions, dataset_id: str, where: str
) -> tuple[dict[str, Any], dict[str, str]]:
    from vlmkit import cache_dir
    from vlmkit.plugins.datasets._download import FAILURES_FILE, DownloadPolicy, download_images

    urls = {r.id: str(r.cells[column]) for r in records}
    folder = Path(getattr(opts, "download_dir", None) or cache_dir("images", dataset_id.replace("/", "--")))
    policy = DownloadPolicy(workers=getattr(opts, "download_workers", DownloadPolicy.workers))
    # rank 0 alone downloads (ranks sharing a folder would write the same files at once)
    done, failed = from_rank_zero(
        lambda: download_images(urls, folder.expanduser(), policy), "downloading images", DataError
    )
    problems = {i: f"{urls[i]}: {why}" for i, why in failed.items()}
    if failed:
        first = min(failed, key=lambda i: urls[i])
        summary = (
            f"{len(failed)} of {len(urls)} images could not be downloaded (first: {problems[first]}); "
            f"all are listed in {folder / FAILURES_FILE}"
        )
        if not done:
            raise DataError(f"{where}: {summary}; pass image_root= to read local files instead")
        warnings.warn(f"{where}: {summary}; they are left out", DataWarning, stacklevel=4)
    return {i: str(path) for i, path in done.items()}, problems


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
    image_root = getattr(opts, "image_root", None)
    root = image_root or opts.path
    if image_root is not None:
        if column is None and {"filepath", "filename"} <= set(columns):  # COCO Karpathy layout
            return _ImageSource("file", "filename", ("filepath", "filename"), image_root)
        column = column or next((c for c in FILE_COLUMNS if c in columns), None)
        if column is not None:
            return _ImageSource("file", column, (column,), root)
    column = column or next((c for c in URL_COLUMNS if c in columns), None)
    if column is not None:
        sample = str(ds.select_columns([column])[0][column])
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
