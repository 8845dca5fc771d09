"""What every dataset plugin shares: options parsing, seeded disjoint splits, a list-backed
``CaptionDataset`` with a fingerprint, and ``mix`` for training on several datasets at once.

Splits are decided per *image identity* (a stable id or relative path), never by position in a
shuffled list: ``assign_split(id, seed)`` hashes the id with the seed onto [0, 1) and compares it
with the split fractions. Adding or removing other images never moves an image to another split,
so a model trained on one version of a dataset is never evaluated on its own training images.

Only light imports here (pydantic, hashlib): dataset plugins import this module at registration.
"""

from __future__ import annotations

import bisect
import contextlib
import difflib
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import AfterValidator, BaseModel, ValidationError

# ``X as X``: core's helpers for loaders, which plugins import from here (vlmkit and the sdk only)
from vlmkit.core.contracts import SPLITS, CaptionDataset, CaptionExample
from vlmkit.core.contracts import read_image_file as read_image_file
from vlmkit.core.errors import ConfigError, DataError, VlmkitWarning
from vlmkit.core.paths import write_json as write_json
from vlmkit.core.progress import progress_bar as progress_bar
from vlmkit.core.ranks import from_rank_zero as from_rank_zero

if TYPE_CHECKING:  # pragma: no cover - typing only
    from vlmkit.core.contracts import DatasetSpec


class DataWarning(VlmkitWarning):
    """Something about the data a user should see, in one line (images skipped, no stable ids)."""


class BadImagesError(DataError):
    """A dataset refused because of bad images; ``problems`` maps each one to what is wrong with it
    (the message names only the first few)."""

    def __init__(self, message: str, problems: Mapping[str, str]) -> None:
        super().__init__(message)
        self.problems = dict(problems)


# --------------------------------------------------------------------------------------- options


def _check_fractions(value: tuple[float, float, float]) -> tuple[float, float, float]:
    if any(f < 0 for f in value) or abs(sum(value) - 1.0) > 1e-6:
        raise ValueError(f"train/validation/test fractions must be >= 0 and sum to 1, got {list(value)}")
    return value


#: ``(train, validation, test)`` fractions, each >= 0, summing to 1; use as a pydantic field type
SplitFractions = Annotated[tuple[float, float, float], AfterValidator(_check_fractions)]

DEFAULT_FRACTIONS: tuple[float, float, float] = (0.8, 0.1, 0.1)


def parse_options(spec: DatasetSpec, options: Mapping[str, Any] | BaseModel | None) -> Any:
    """Validate ``options`` against ``spec.options``; ``ConfigError`` naming the offending key.

    Accepts a mapping (from YAML or the CLI), an instance of the options model, or ``None``.
    """
    model = spec.options
    if model is None:
        if options:
            raise ConfigError(f"dataset {spec.name!r} takes no options, got: {', '.join(map(str, options))}")
        return None
    if isinstance(options, model):
        return options
    if isinstance(options, BaseModel):
        options = options.model_dump()
    try:
        return model.model_validate(dict(options or {}))
    except ValidationError as exc:
        raise ConfigError(_options_error(spec.name, model, exc)) from None


def _options_error(name: str, model: type[BaseModel], exc: ValidationError) -> str:
    fields = list(model.model_fields)
    problems = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "options"
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(err["loc"][0]), fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"unknown option {key!r}{hint}")
        elif err["type"] == "missing":
            problems.append(f"option {key!r} is required")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"option {key!r}: {msg} (got {err.get('input')!r})")
    return f"dataset {name!r}: {'; '.join(problems)}. Options: {', '.join(fields)}"


def tsv_field(text: str) -> str:
    r"""``text`` as one field of a tab-separated line: backslash, TAB, CR and LF escaped as
    ``\\ \t \r \n``, other control characters as ``\xNN``. A caption or a file name
    holding a TAB, a newline or a terminal escape cannot break the columns or the terminal."""
    return "".join(_TSV_ESCAPES.get(c) or (f"\\x{ord(c):02x}" if _is_control(c) else c) for c in text)


_TSV_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\r": "\\r", "\n": "\\n"}


def _is_control(char: str) -> bool:
    return ord(char) < 32 or 127 <= ord(char) < 160


# --------------------------------------------------------------------------------------- splits


def check_split(split: str, source: str = "dataset") -> str:
    if split not in SPLITS:
        raise DataError(f"{source}: unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return split


def unit_hash(identity: str, seed: int) -> float:
    """A stable number in [0, 1) for ``identity`` under ``seed`` (same on every machine and run)."""
    digest = hashlib.sha256(f"vlmkit-split:{seed}:{identity}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(identity: str, seed: int, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> str:
    """The split of one image, from its identity alone (stable when other images come and go)."""
    u = unit_hash(identity, seed)
    train, validation, _ = fractions
    if u < train:
        return "train"
    if u < train + validation:
        return "validation"
    return "test"


def stratified_splits(
    ids_by_class: Mapping[str, Sequence[str]], seed: int, fractions: Sequence[float] = DEFAULT_FRACTIONS
) -> dict[str, str]:
    """``id -> split`` with every class present in every split that has a non-zero fraction.

    For small, closed datasets (``shapes``) where each split must hold every caption class: within
    a class, ids are ranked by their seeded hash and the first ones go to test, then validation.
    """
    train_f, val_f, test_f = fractions
    out: dict[str, str] = {}
    for ids in ids_by_class.values():
        ranked = sorted(ids, key=lambda i: unit_hash(i, seed))
        n = len(ranked)
        n_test = min(n, max(1 if test_f > 0 else 0, round(n * test_f)))
        rest = n - n_test
        n_val = min(rest, max(1 if val_f > 0 and (rest > 1 or train_f == 0) else 0, round(n * val_f)))
        for i, identity in enumerate(ranked):
            out[identity] = "test" if i < n_test else "validation" if i < n_test + n_val else "train"
    return out


# --------------------------------------------------------------------------------------- datasets


#: the folder of remembered image checks, in a cache root (a feature cache leaves it alone)
IMAGE_CHECKS = "image-checks"
#: where datasets keep files derived from the data (``image_checks_dir``); None: $VLMKIT_HOME
_CACHE_ROOT: ContextVar[Path | None] = ContextVar("vlmkit_dataset_cache_root", default=None)


@contextlib.contextmanager
def dataset_cache_root(path: str | Path | None) -> Iterator[None]:
    """While active, datasets keep what they derive from the data (the ``folder`` dataset's
    remembered image checks) under ``path``: ``vlmkit train`` passes its cache folder
    (``--cache-dir``). ``None``: ``$VLMKIT_HOME``."""
    token = _CACHE_ROOT.set(Path(path).expanduser() if path is not None else None)
    try:
        yield
    finally:
        _CACHE_ROOT.reset(token)


def image_checks_dir() -> Path:
    """``image-checks/`` of the active ``dataset_cache_root``, else of ``$VLMKIT_HOME`` (not
    created here: whoever writes creates it)."""
    from vlmkit.core.paths import cache_dir

    root = _CACHE_ROOT.get()
    return (root if root is not None else cache_dir()) / IMAGE_CHECKS


def derived_data_dir(name: str) -> Path:
    """``name/`` of the active ``dataset_cache_root``, else of ``$VLMKIT_HOME``: where a dataset
    keeps what it derives from the data (``hf-datasets/``: the Arrow copies ``datasets`` makes of
    parquet files, which would otherwise land in ``~/.cache/huggingface``). Not created here."""
    from vlmkit.core.paths import cache_dir

    root = _CACHE_ROOT.get()
    return (root if root is not None else cache_dir()) / name


def fingerprint(*parts: Any) -> str:
    """sha256 of ``parts`` as canonical JSON (anything JSON can't encode goes through ``str``)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class ListDataset:
    """A ``CaptionDataset`` over a list of examples.

    ``fingerprint`` must change whenever the images or their order change (the feature cache keys
    on it); ``info`` carries what the loader wants to report (skipped files, upstream split, ...).
    """

    examples: list[CaptionExample]
    fingerprint: str
    name: str = "dataset"
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> CaptionExample:
        return self.examples[index]

    def __iter__(self) -> Iterator[CaptionExample]:
        return iter(self.examples)

    def __repr__(self) -> str:
        return f"ListDataset(name={self.name!r}, examples={len(self)}, fingerprint={self.fingerprint[:12]})"


class MixedDataset:
    """Several datasets end to end; ids become ``<name>/<id>`` so they stay unique."""

    def __init__(self, datasets: Sequence[CaptionDataset], names: Sequence[str]) -> None:
        self.datasets = list(datasets)
        self.names = list(names)
        self.name = "+".join(self.names)
        self._ends: list[int] = []
        total = 0
        for ds in self.datasets:
            total += len(ds)
            self._ends.append(total)
        self.fingerprint = fingerprint(
            "mix", [[n, ds.fingerprint] for n, ds in zip(self.names, self.datasets, strict=True)]
        )

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, index: int) -> CaptionExample:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        which = bisect.bisect_right(self._ends, index)
        start = self._ends[which - 1] if which else 0
        ex = self.datasets[which][index - start]
        return CaptionExample(id=f"{self.names[which]}/{ex.id}", captions=ex.captions, image=ex.image)

    def __iter__(self) -> Iterator[CaptionExample]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}: {len(d)}" for n, d in zip(self.names, self.datasets, strict=True))
        return f"MixedDataset({parts})"


def mix(datasets: Sequence[CaptionDataset], names: Sequence[str] | None = None) -> CaptionDataset:
    """One dataset from several (``--dataset flickr30k --dataset coco``).

    Examples keep their order, dataset after dataset; ids are prefixed with the dataset's name
    (``names``, else each dataset's ``name`` attribute) and the fingerprint combines the parts'.
    A single dataset is returned unchanged, so its feature cache is shared with unmixed runs.
    """
    datasets = list(datasets)
    if not datasets:
        raise DataError("mix: no datasets given")
    if len(datasets) == 1:
        return datasets[0]
    if names is None:
        names = [getattr(ds, "name", None) or f"dataset{i}" for i, ds in enumerate(datasets)]
    if len(names) != len(datasets):
        raise ValueError(f"mix: {len(datasets)} datasets but {len(names)} names")
    unique: list[str] = []
    for name in names:  # the same dataset twice (two caption variants, say) still gets distinct ids
        candidate, n = name, 2
        while candidate in unique:
            candidate, n = f"{name}-{n}", n + 1
        unique.append(candidate)
    return MixedDataset(datasets, unique)


def load_split(datasets: Sequence[Any], split: str, *, seed: int = 0, registry=None) -> CaptionDataset:
    """The mixed ``split`` of ``datasets`` (``DatasetConfig``s: plugin name and options; one
    dataset is returned as it is)."""
    from vlmkit.core.registry import get_registry

    registry = registry or get_registry()
    parts = []
    for entry in datasets:
        spec = registry.dataset(entry.name)
        parts.append((entry.name, spec.load(split, entry.options, seed=seed)))
    if len(parts) == 1:
        return parts[0][1]
    return mix([data for _, data in parts], names=[name for name, _ in parts])


#: what a loader's ``info`` may say about where its rows came from; runs record it in their manifest
PROVENANCE_KEYS = ("source", "revision", "splits_from")


def data_sources(data: CaptionDataset) -> list[dict[str, Any]]:
    """Per dataset of ``data`` (a mix or one dataset): its name and the ``PROVENANCE_KEYS`` its
    loader reported (a hub dataset's id, the revision read, where its split came from), so a
    run's manifest says which data it trained on."""
    names = getattr(data, "names", None) or [getattr(data, "name", "dataset")]
    parts = getattr(data, "datasets", None) or [data]
    out = []
    for name, part in zip(names, parts, strict=True):
        info = getattr(part, "info", None)
        info = info if isinstance(info, dict) else {}
        out.append({"name": name, **{k: info[k] for k in PROVENANCE_KEYS if info.get(k) is not None}})
    return out


#: a caption longer than this (characters) is refused: it is not a caption, and a tokenizer would
#: spend seconds on it before training cut it to ``max_caption_tokens``
MAX_CAPTION_CHARS = 10_000


def text_problem(text: str, what: str = "caption") -> str | None:
    """What makes ``text`` unusable as a caption or a file name, or ``None``: longer than
    ``MAX_CAPTION_CHARS``, or holding a lone surrogate (``\\ud800`` in JSON: no character at all,
    which tokenizers and UTF-8 files refuse)."""
    if len(text) > MAX_CAPTION_CHARS:
        return f"the {what} is {len(text)} characters long, more than {MAX_CAPTION_CHARS}"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"the {what} holds {text[exc.start]!r} at character {exc.start}, a lone surrogate: not text"
    return None


def captions_of(value: Any) -> list[str]:
    """Reference captions from what a dataset file holds for one image: a string, a JSON list in
    a string (CSV cells), a list of strings, or of dicts with ``raw``/``caption``/``text`` (the
    Karpathy JSON). Stripped; blanks and repeats dropped; ``[]`` for anything else."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        with contextlib.suppress(json.JSONDecodeError, RecursionError):  # "[[[[..." is no list of captions
            value = json.loads(value)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        return []
    out: list[str] = []
    for item in value:
        if isinstance(item, dict):
            item = item.get("raw") or item.get("caption") or item.get("text")
        if isinstance(item, str) and item.strip() and item.strip() not in out:
            out.append(item.strip())
    return out
