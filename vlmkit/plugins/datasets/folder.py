"""``folder``: your own images and captions, in a folder.

The folder holds images and one captions file, found in this order unless ``captions`` names it:

- ``captions.jsonl``: one JSON object per line, ``{"file_name": "a.jpg", "caption": "..."}``;
  the image key may be ``file_name``, ``image`` or ``filename``; the caption key ``caption``,
  ``captions`` or ``text``, holding a string or a list of strings. Several lines may name the same
  image: their captions are merged.
- ``captions.csv``: the same columns; a ``captions`` cell may hold a JSON list.
- ``metadata.jsonl`` / ``metadata.csv``: the Hugging Face ``imagefolder`` layout
  (``file_name`` plus ``text`` or ``caption``), so a folder prepared for ``datasets`` works as is.

Image paths are relative to the captions file. Every image is checked when the dataset loads,
by decoding it the way training will (``CaptionExample.load_image``; a JPEG at 1/8 scale), so
training never dies mid-epoch on a bad file. Usable images are remembered in
``$VLMKIT_HOME/image-checks`` by path, size and mtime, so later runs decode only new or changed
files (a file replaced keeping its size and mtime is not noticed: touch it). Under
``torch.distributed`` rank 0 checks and the other ranks receive its results. A path that resolves outside the folder (``../``, an
absolute path, a symlink out) is a bad image, never read, unless ``allow_outside=true``.
``on_bad_image="error"`` (the default) refuses the folder naming the bad files; ``"skip"`` leaves
them out and reports one summary line. Either way ``info["problems"]`` maps every bad image to
what is wrong with it (``vlmkit train`` writes it to ``bad_images.tsv`` in the run folder).
"""

from __future__ import annotations

import contextlib
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
from vlmkit.core.contracts import CaptionExample, DatasetSpec, read_image_file
from vlmkit.core.errors import DataError
from vlmkit.core.paths import cache_dir, write_json
from vlmkit.sdk.datasets import (
    DEFAULT_FRACTIONS,
    BadImagesError,
    DataWarning,
    ListDataset,
    SplitFractions,
    assign_split,
    captions_of,
    check_split,
    fingerprint,
    from_rank_zero,
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
    allow_outside: bool = Field(
        False, description="read image paths that resolve outside the folder (../, absolute, symlinks out)"
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
        inside = None if opts.allow_outside else {root, base.resolve()}
        checks = _check_images(list(paths.values()), inside, root)
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
        info = {"split": split, "captions_file": str(captions_file), "skipped": sorted(bad), "problems": bad}
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
OUTSIDE = "is outside the folder (not read; pass allow_outside=true to use it)"
#: usable images of a folder (path -> size, mtime_ns, sha256), remembered across runs in
#: $VLMKIT_HOME/image-checks: a second run on 30,000 images stats them instead of decoding them
CHECKS_VERSION = 1
_READ_STORES: set[str] = set()


def _check_images(
    paths: list[Path], inside: set[Path] | None, folder: Path
) -> dict[Path, tuple[str | None, str]]:
    """For each path: ``(None, sha256)`` when usable, else ``(what is wrong, "")``: ``"missing"``,
    ``"is outside the folder ..."`` or why it is unreadable. ``inside``: where images must resolve.

    Under ``torch.distributed`` rank 0 checks and the other ranks receive its results (every rank
    loads the same splits in the same order, so they meet here alike).
    """
    return from_rank_zero(lambda: _check_remembered(paths, inside, folder), "checking the images")


def _check_remembered(paths: list[Path], inside: set[Path] | None, folder: Path):
    name = f"{hashlib.sha256(str(folder).encode()).hexdigest()[:24]}.json"
    if name not in _READ_STORES:  # once per process: train, validation and test share it
        _READ_STORES.add(name)
        try:
            remembered = json.loads((cache_dir("image-checks") / name).read_text())
            if remembered.get("version") == CHECKS_VERSION:
                for path, (size, mtime, digest) in remembered["images"].items():
                    _CHECKED.setdefault((path, size, mtime), (None, digest))
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            pass  # none yet, or unreadable: check every image again
    # known images are only stat'ed, here; threads decode the others (30,000 futures cost seconds)
    checked = {p: _check_image(p, inside, decode=False) for p in paths}
    new = [p for p, result in checked.items() if result is None]
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        checked.update(zip(new, pool.map(lambda p: _check_image(p, inside), new), strict=True))
    if new:  # only usable images: a bad one may be fixed without its mtime changing
        usable = {
            str(p): [key[1], key[2], digest] for p, (why, digest, key) in checked.items() if why is None
        }
        with contextlib.suppress(OSError):  # no writable cache only costs the next run the decoding
            data = {"version": CHECKS_VERSION, "folder": str(folder), "images": usable}
            write_json(cache_dir("image-checks") / name, data, indent=0)
    return {p: (why, digest) for p, (why, digest, _) in checked.items()}


def _check_image(
    path: Path, inside: set[Path] | None, decode: bool = True
) -> tuple[str | None, str, tuple | None] | None:
    """``(problem or None, sha256, (path, size, mtime_ns) or None)``; ``None`` when ``decode`` is
    off and the image would need decoding."""
    if inside is not None and not any(path.resolve().is_relative_to(f) for f in inside):
        return OUTSIDE, "", None  # resolve() follows symlinks: a link out is outside
    try:
        stat = path.stat()
    except FileNotFoundError:
        return "missing", "", None
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})", "", None
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _CHECKED:
        if not decode:
            return None
        _CHECKED[key] = _verify(path)
    return (*_CHECKED[key], key)


def _verify(path: Path) -> tuple[str | None, str]:
    """Decode ``path`` with the loader training uses: what passes here does not fail there."""
    try:
        data = read_image_file(path)
        CaptionExample(id="", captions=[], image=data).load_image(draft=True)
    except FileNotFoundError:
        return "missing", ""
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})", ""
    except DataError as exc:  # "image '' is not a readable image (...)": the id is added later
        return str(exc).removeprefix("image '' "), ""
    return None, hashlib.sha256(data).hexdigest()


def _report_bad(source: str, bad: dict[str, str], total: int, mode: str) -> None:
    kinds: dict[str, list[str]] = {"missing": [], "outside the folder": [], "unreadable": []}
    for image_id, why in sorted(bad.items()):
        kind = "missing" if why == "missing" else "outside the folder" if why == OUTSIDE else "unreadable"
        kinds[kind].append(image_id)

    def names(ids: list[str]) -> str:
        return ", ".join(ids[:5]) + (f", ... ({len(ids) - 5} more)" if len(ids) > 5 else "")

    detail = "; ".join(f"{len(ids)} {kind}: {names(ids)}" for kind, ids in kinds.items() if ids)
    if mode == "skip":
        warnings.warn(f"{source}: {len(bad)} of {total} images skipped ({detail})", DataWarning, stacklevel=3)
        return
    first = next(iter(kinds["unreadable"] + kinds["outside the folder"]), None)
    why = f" ({first} {bad[first]})" if first else ""
    raise BadImagesError(
        f"{source}: {len(bad)} of {total} images cannot be used ({detail}){why}; fix or remove them, "
        "or pass on_bad_image=skip to leave them out",
        problems=bad,
    )


@vlmkit.hookimpl
def register_datasets(register):
    register(FolderDataset())
