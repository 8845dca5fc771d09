"""``folder``: your own images and captions, in a folder.

The folder holds images and one captions file, found in this order unless ``captions`` names it:

- ``captions.jsonl``: one JSON object per line, ``{"file_name": "a.jpg", "caption": "..."}``;
  the image key may be ``file_name``, ``image`` or ``filename``; the caption key ``caption``,
  ``captions`` or ``text``, holding a string or a list of strings. Several lines may name the same
  image: their captions are merged.
- ``captions.csv``: the same columns; a ``captions`` cell may hold a JSON list.
- ``metadata.jsonl`` / ``metadata.csv``: the Hugging Face ``imagefolder`` layout
  (``file_name`` plus ``text`` or ``caption``), so a folder prepared for ``datasets`` works as is.

Image paths are relative to the captions file. Every image is checked when the dataset loads
(it exists, its header parses, a JPEG decodes to the end), so training never dies mid-epoch on a
bad file. ``on_bad_image="error"`` (the default) refuses the folder naming the bad files;
``"skip"`` leaves them out and reports one summary line.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

import vlmkit
from vlmkit.core.contracts import CaptionExample, DatasetSpec
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
)

CAPTION_FILES = ("captions.jsonl", "captions.csv", "metadata.jsonl", "metadata.csv")
IMAGE_KEYS = ("file_name", "image", "filename")
CAPTION_KEYS = ("caption", "captions", "text")
FORMAT_VERSION = 1


class FolderOptions(BaseModel):
    """Options of the ``folder`` dataset."""

    model_config = ConfigDict(extra="forbid")

    path: Path = Field(description="the folder with the images and the captions file")
    captions: str | None = Field(
        None,
        description="captions file, relative to path or absolute (default: the first of "
        + ", ".join(CAPTION_FILES)
        + ")",
    )
    on_bad_image: Literal["error", "skip"] = Field(
        "error",
        description="a missing or unreadable image: error refuses the folder, skip leaves the image out",
    )
    split_fractions: SplitFractions = Field(
        DEFAULT_FRACTIONS,
        description="train / validation / test fractions; each image's split comes from a hash of its path",
    )


class FolderDataset(DatasetSpec):
    name: ClassVar[str] = "folder"
    description: ClassVar[str] = (
        "Your images with captions.jsonl/.csv or an imagefolder metadata.jsonl (option path=...)"
    )
    options: ClassVar[type[BaseModel]] = FolderOptions

    def load(self, split: str, options: Mapping[str, Any] | None = None, *, seed: int = 0) -> ListDataset:
        opts: FolderOptions = parse_options(self, options)
        root = opts.path.expanduser().resolve()
        source = f"folder {root}"
        check_split(split, source)
        if not root.is_dir():
            raise DataError(f"{source}: no such folder")
        captions_file = _find_captions_file(root, opts.captions, source)
        entries = _read_captions(captions_file, source)
        if not entries:
            raise DataError(f"{source}: {captions_file.name} lists no images")

        base = captions_file.parent
        paths = {image_id: _resolve(base, image_id) for image_id in entries}
        checks = _check_images(list(paths.values()))
        bad = {i: checks[paths[i]][0] for i in entries if checks[paths[i]][0] is not None}
        if bad:
            _report_bad(source, bad, len(entries), opts.on_bad_image)

        examples, digests = [], []
        for image_id in sorted(entries):
            if image_id in bad or assign_split(image_id, seed, opts.split_fractions) != split:
                continue
            examples.append(
                CaptionExample(id=image_id, captions=entries[image_id], image=str(paths[image_id]))
            )
            digests.append([image_id, checks[paths[image_id]][1]])
        if not examples:
            usable = len(entries) - len(bad)
            raise DataError(
                f"{source}: split {split!r} is empty ({usable} usable images, split_fractions="
                f"{list(opts.split_fractions)}); add images or change split_fractions"
            )
        # ids and content hashes, not the folder's location: a moved folder keeps its feature cache
        fp = fingerprint("folder", FORMAT_VERSION, split, seed, digests)
        info = {"split": split, "captions_file": str(captions_file), "skipped": sorted(bad)}
        return ListDataset(examples, fp, name="folder", info=info)


# --------------------------------------------------------------------------------------- captions


def _find_captions_file(root: Path, name: str | None, source: str) -> Path:
    if name is not None:
        path = Path(name).expanduser()
        path = path if path.is_absolute() else root / path
        if not path.is_file():
            raise DataError(f"{source}: captions file {path} not found")
        return path
    for candidate in CAPTION_FILES:
        if (root / candidate).is_file():
            return root / candidate
    raise DataError(
        f"{source}: no captions file (looked for {', '.join(CAPTION_FILES)}); write captions.jsonl "
        'with lines like {"file_name": "a.jpg", "caption": "A dog on a beach."}, or pass captions=FILE'
    )


def _read_captions(path: Path, source: str) -> dict[str, list[str]]:
    """``image path (as written) -> captions``, merging repeated images, in file order."""
    rows: list[tuple[int, dict[str, Any]]] = []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{source}: cannot read {path.name}: {exc}") from exc
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        rows = [(n + 2, row) for n, row in enumerate(reader)]  # line 1 is the header
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{source}: {path.name} line {n} is not JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{source}: {path.name} line {n} is not a JSON object")
            rows.append((n, row))

    entries: dict[str, list[str]] = {}
    for line, row in rows:
        where = f"{source}: {path.name} line {line}"
        image = next((row[k] for k in IMAGE_KEYS if row.get(k)), None)
        if not isinstance(image, str):
            raise DataError(f"{where} names no image (use one of the keys {', '.join(IMAGE_KEYS)})")
        raw = next((row[k] for k in CAPTION_KEYS if row.get(k) not in (None, "")), None)
        captions = captions_of(raw)
        if not captions:
            raise DataError(
                f"{where} has no caption for {image} (use one of the keys {', '.join(CAPTION_KEYS)})"
            )
        merged = entries.setdefault(Path(image).as_posix(), [])
        merged.extend(c for c in captions if c not in merged)
    return entries


def _resolve(base: Path, image: str) -> Path:
    path = Path(image).expanduser()
    return path if path.is_absolute() else base / path


# --------------------------------------------------------------------------------------- images

# (path, size, mtime_ns) -> (problem or None, sha256 of the bytes). Loading train, validation and
# test reads each file once per process, not three times.
_CHECKED: dict[tuple[str, int, int], tuple[str | None, str]] = {}


def _check_images(paths: list[Path]) -> dict[Path, tuple[str | None, str]]:
    """For each path: ``(None, sha256)`` when usable, else ``("missing" | "unreadable: why", "")``."""
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        return dict(zip(paths, pool.map(_check_image, paths), strict=True))


def _check_image(path: Path) -> tuple[str | None, str]:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return "missing", ""
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}", ""
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _CHECKED:
        _CHECKED[key] = _verify(path)
    return _CHECKED[key]


def _verify(path: Path) -> tuple[str | None, str]:
    from PIL import Image

    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}", ""
    digest = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()  # structure and checksums (PNG CRCs); decodes no pixels
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "JPEG":
                # verify() reads only the header of a JPEG: decode at 1/8 scale (cheap) to catch
                # truncated files, the commonest corruption
                img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
                img.load()
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        return f"unreadable: {type(exc).__name__}: {exc}".split("\n")[0], ""
    return None, digest


def _report_bad(source: str, bad: dict[str, str], total: int, mode: str) -> None:
    missing = sorted(i for i, why in bad.items() if why == "missing")
    unreadable = sorted(i for i, why in bad.items() if why != "missing")

    def names(ids: list[str]) -> str:
        return ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing: {names(missing)}")
    if unreadable:
        parts.append(f"{len(unreadable)} unreadable: {names(unreadable)}")
    detail = "; ".join(parts)
    if mode == "skip":
        warnings.warn(f"{source}: {len(bad)} of {total} images skipped ({detail})", DataWarning, stacklevel=3)
        return
    first = unreadable[0] if unreadable else None
    why = f" ({first}: {bad[first].removeprefix('unreadable: ')})" if first else ""
    raise DataError(
        f"{source}: {len(bad)} of {total} images cannot be used ({detail}){why}; fix or remove them, "
        "or pass on_bad_image=skip to leave them out"
    )


@vlmkit.hookimpl
def register_datasets(register):
    register(FolderDataset())
