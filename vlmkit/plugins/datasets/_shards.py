"""Reading a hub dataset's files shard by shard, so shards that disagree on their schema still load.

``datasets.load_dataset`` and ``load_from_disk`` join a split's shards into one table and refuse
when their columns differ (``CastError: column names don't match``): ``Mozilla/coco-gpt4o`` has
``alt_text`` as a string in some of its ~160 shards and a list in others, and that failure comes
after tens of GB were downloaded. Here each shard is opened on its own (an ``.arrow`` shard is
memory-mapped, a ``.parquet`` one converted once into the ``datasets`` cache) and kept as its own
part; the caller reads the columns it needs from each and normalises their values (a caption
string or a list of them), so no shard ever has to match another.

Layouts read (the two that hub repositories and ``save_to_disk`` write):

- ``dataset_dict.json`` + one folder per split holding ``data-NNNNN-of-NNNNN.arrow`` shards
  (``save_to_disk``; ``Mozilla/coco-gpt4o`` is such a folder pushed as is);
- parquet or arrow files whose path names the split, as the hub's own data-file convention does:
  ``data/train-00000-of-00001.parquet``, ``TEST/test/0000.parquet`` (a ``refs/convert/parquet``
  export), ``validation/0000.parquet``. Files that name no split (``coco.parquet``) are left out.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmkit import DataError
from vlmkit.sdk.datasets import progress_bar

SHARD_SUFFIXES = (".arrow", ".parquet")
#: a split name in a file or folder name: ``train-00000-of-00001``, ``test``, ``validation_0``
_SPLIT_WORD = re.compile(r"^([a-z]+)(?:[-_.].*)?$")


@dataclass(frozen=True)
class Shard:
    """One data file and the upstream split it belongs to."""

    split: str
    path: Path

    @property
    def name(self) -> str:
        return f"{self.split}/{self.path.name}"


def find_shards(root: Path, split_names: set[str], where: str) -> list[Shard]:
    """The shards under ``root``, in a stable order; ``[]`` when it holds no arrow/parquet files
    (an imagefolder or CSV copy, which ``load_dataset`` reads instead)."""
    manifest = root / "dataset_dict.json"
    if manifest.is_file():
        try:
            splits = json.loads(manifest.read_text())["splits"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(
                f"{where}: {manifest} is not a dataset_dict.json ({exc}); download it again"
            ) from None
        shards = []
        for split in splits:
            files = _split_files(root / split)
            if not files:
                raise DataError(
                    f"{where}: {manifest} lists split {split!r} but {root / split} has no .arrow files"
                )
            shards += [Shard(split, f) for f in files]
        return shards
    if (root / "state.json").is_file():  # one split saved with save_to_disk
        return [Shard("all", f) for f in _split_files(root)]
    shards = []
    for path in sorted(p for p in root.rglob("*") if p.suffix in SHARD_SUFFIXES and p.is_file()):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):  # .cache/, .git/
            continue
        split = _split_of(relative, split_names)
        if split is not None:
            shards.append(Shard(split, path))
    return shards


def _split_files(folder: Path) -> list[Path]:
    """A ``save_to_disk`` split's shards, in ``state.json``'s order when it lists them."""
    state = folder / "state.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        listed = [folder / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
        if listed and all(p.is_file() for p in listed):
            return listed
    return sorted(folder.glob("*.arrow"))


def _split_of(relative: Path, split_names: set[str]) -> str | None:
    """The split a file's path names, from the file name outwards (``data/train-0.parquet``)."""
    for part in [relative.stem, *reversed(relative.parts[:-1])]:
        match = _SPLIT_WORD.match(part.lower())
        if match and match.group(1) in split_names:
            return match.group(1)
    return None


def open_shards(shards: list[Shard], where: str, *, progress: bool | None = None) -> list[tuple[Shard, Any]]:
    """``(shard, datasets.Dataset)`` for each shard, opened one by one; a shard that cannot be
    read is one ``DataError`` naming it."""
    import datasets

    out = []
    with progress_bar("reading shards", len(shards), progress) as advance:
        for shard in shards:
            try:
                if shard.path.suffix == ".arrow":
                    ds = datasets.Dataset.from_file(str(shard.path))
                else:
                    with _quiet_datasets():  # its Arrow copy under vlmkit's cache, not ~/.cache/huggingface
                        ds = datasets.Dataset.from_parquet(str(shard.path), cache_dir=str(_arrow_copies()))
            except Exception as exc:  # noqa: BLE001 - a truncated or foreign file: one clear line
                reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
                raise DataError(
                    f"{where}: cannot read shard {shard.path} ({reason}); download it again"
                ) from exc
            if len(ds):
                out.append((shard, ds))
            advance(1)
    return out


def _arrow_copies() -> Path:
    from vlmkit.sdk.datasets import derived_data_dir

    return derived_data_dir("hf-datasets")


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No per-shard progress bars from ``datasets`` under ours."""
    from datasets.utils import logging as ds_logging

    was = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            ds_logging.enable_progress_bar()
