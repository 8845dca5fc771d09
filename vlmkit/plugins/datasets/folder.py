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
``image-checks/`` of the run's cache folder (``vlmkit train --cache-dir``; ``$VLMKIT_HOME``
otherwise) by path, size and mtime, so later runs decode only new or changed files (a file
replaced keeping its size and mtime is not noticed: touch it). Under
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
import stat as stat_module
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

import vlmkit
from vlmkit import CaptionExample, DataError, DatasetSpec
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
    image_checks_dir,
    parse_options,
    read_image_file,
    text_problem,
    write_json,
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
    local = True  # never downloads
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
        parsed = _read_captions(captions_file, source)
        entries, paths = parsed.entries, parsed.paths
        if not entries:
            raise DataError(f"{source}: {captions_file.name} lists no images")

        inside = None if opts.allow_outside else {str(root), str(captions_file.parent.resolve())}
        checks = _check_images(list(paths.values()), inside, root)
        bad = {i: checks[paths[i]][0] for i in entries if checks[paths[i]][0] is not None}
        if bad:
            _report_bad(source, bad, len(entries), opts.on_bad_image)

        examples, digests = [], []
        for image_id in parsed.ids_in(split, seed, opts.split_fractions):
            if image_id in bad:
                continue
            examples.append(CaptionExample(id=image_id, captions=entries[image_id], image=paths[image_id]))
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


@dataclass
class _Parsed:
    """A captions file read: ``entries`` (image path as written -> captions, in file order) and
    ``paths`` (-> the file's path, a plain string: on 30,000 images pathlib costs seconds)."""

    entries: dict[str, list[str]]
    paths: dict[str, str]
    _splits: dict[tuple, dict[str, list[str]]] = field(default_factory=dict)

    def ids_in(self, split: str, seed: int, fractions) -> list[str]:
        """The sorted ids of ``split`` (of every image, usable or not), assigned once per seed."""
        key = (seed, tuple(fractions))
        if key not in self._splits:
            by_split: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
            for image_id in sorted(self.entries):
                by_split[assign_split(image_id, seed, fractions)].append(image_id)
            self._splits[key] = by_split
        return self._splits[key][split]


#: (captions file, size, mtime_ns) -> what it holds: train, validation and test parse it once
_PARSED: dict[tuple[str, int, int], _Parsed] = {}


def _read_captions(path: Path, source: str) -> _Parsed:
    """The images and captions of ``path``, merging repeated images; parsed once per process
    while the file keeps its size and mtime."""
    try:
        stat = path.stat()
    except OSError as exc:
        raise DataError(f"{source}: cannot read {path.name}: {exc}") from exc
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _PARSED:
        if len(_PARSED) >= 4:  # a few files (a mix of folders), not every file a process ever read
            _PARSED.clear()
        entries = _parse_captions(path, source)
        base = str(path.parent)
        _PARSED[key] = _Parsed(entries, {image_id: _resolve(base, image_id) for image_id in entries})
    return _PARSED[key]


#: a captions file larger than this is refused unread (COCO's 600,000 captions take 60 MB)
MAX_CAPTIONS_FILE_BYTES = 1 << 30


def _parse_captions(path: Path, source: str) -> dict[str, list[str]]:
    """Rows of ``path`` (JSON lines or CSV) within limits: the file's size, a CSV field's length
    (csv's own limit), JSON nesting (Python's recursion limit), and each caption's and file name's
    text (``text_problem``); any of them broken is one ``DataError`` naming the line."""
    rows: list[tuple[int, dict[str, Any]]] = []
    try:
        if (size := path.stat().st_size) > MAX_CAPTIONS_FILE_BYTES:
            raise DataError(f"{source}: {path.name} is {size} bytes, more than {MAX_CAPTIONS_FILE_BYTES}")
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{source}: cannot read {path.name}: {exc}") from exc
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        try:
            rows = [(reader.line_num, row) for row in reader]
        except csv.Error as exc:  # a field over csv.field_size_limit() (131,072 characters), a NUL
            line = reader.line_num + 1  # the lines read before the one that failed
            raise DataError(f"{source}: {path.name} line {line} is not valid CSV ({exc})") from None
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{source}: {path.name} line {n} is not JSON ({exc.msg})") from None
            except RecursionError:
                raise DataError(f"{source}: {path.name} line {n} is JSON nested too deeply to read") from None
            if not isinstance(row, dict):
                raise DataError(f"{source}: {path.name} line {n} is not a JSON object")
            rows.append((n, row))

    entries: dict[str, list[str]] = {}
    for line, row in rows:
        where = f"{source}: {path.name} line {line}"
        image = next((row[k] for k in IMAGE_KEYS if row.get(k)), None)
        if not isinstance(image, str):
            raise DataError(f"{where} names no image (use one of the keys {', '.join(IMAGE_KEYS)})")
        if problem := text_problem(image, "file name"):
            raise DataError(f"{where}: {problem}")
        key, raw = next(((k, row[k]) for k in CAPTION_KEYS if row.get(k) not in (None, "")), (None, None))
        captions = captions_of(raw)
        if not captions and raw is not None and not isinstance(raw, (str, list)):
            kind = {bool: "boolean", int: "number", float: "number", dict: "object"}.get(type(raw), "value")
            raise DataError(f"{where}: the {key!r} of {image} is a JSON {kind}, not text")
        if not captions:
            raise DataError(
                f"{where} has no caption for {image} (use one of the keys {', '.join(CAPTION_KEYS)})"
            )
        for caption in captions:
            if problem := text_problem(caption):
                raise DataError(f"{where}: {problem}")
        merged = entries.setdefault(_as_posix(image), [])
        merged.extend(c for c in captions if c not in merged)
    return entries


def _as_posix(image: str) -> str:
    """``Path(image).as_posix()`` (``./a.jpg`` -> ``a.jpg``, ``a//b`` -> ``a/b``), without building
    a Path for the names that need no change (nearly all of them)."""
    if "//" in image or "/." in image or image.startswith("./") or image.endswith("/") or image == ".":
        return Path(image).as_posix()
    return image


def _resolve(base: str, image: str) -> str:
    """The image's path as ``str(Path(base) / Path(image).expanduser())`` gives it (ids are already
    normalised by ``_as_posix``)."""
    return os.path.join(base, os.path.expanduser(image) if image.startswith("~") else image)


# --------------------------------------------------------------------------------------- images

# (path, size, mtime_ns) -> (problem or None, sha256 of the bytes). Loading train, validation and
# test reads each file once per process, not three times.
_CHECKED: dict[tuple[str, int, int], tuple[str | None, str]] = {}
OUTSIDE = "is outside the folder (not read; pass allow_outside=true to use it)"
#: usable images of a folder (path -> size, mtime_ns, sha256), remembered across runs in
#: image_checks_dir(): a second run on 30,000 images stats them instead of decoding them
CHECKS_VERSION = 1
_READ_STORES: set[str] = set()


def _check_images(
    paths: list[str], inside: set[str] | None, folder: Path
) -> dict[str, tuple[str | None, str]]:
    """For each path: ``(None, sha256)`` when usable, else ``(what is wrong, "")``: ``"missing"``,
    ``"is outside the folder ..."`` or why it is unreadable. ``inside``: real folders where images
    must resolve.

    Under ``torch.distributed`` rank 0 checks and the other ranks receive its results (every rank
    loads the same splits in the same order, so they meet here alike).
    """
    return from_rank_zero(lambda: _check_remembered(paths, inside, folder), "checking the images", DataError)


def _check_remembered(paths: list[str], inside: set[str] | None, folder: Path):
    name = f"{hashlib.sha256(str(folder).encode()).hexdigest()[:24]}.json"
    try:
        store: Path | None = image_checks_dir()
    except OSError:  # no writable $VLMKIT_HOME: every image is checked, nothing remembered
        store = None
    if store is not None and str(store / name) not in _READ_STORES:  # once per process and store
        _READ_STORES.add(str(store / name))
        try:
            remembered = json.loads((store / name).read_text())
            if remembered.get("version") == CHECKS_VERSION:
                for path, (size, mtime, digest) in remembered["images"].items():
                    _CHECKED.setdefault((path, size, mtime), (None, digest))
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            pass  # none yet, or unreadable: check every image again
    # known images are only stat'ed, here; threads decode the others (30,000 futures cost seconds)
    real_dirs: dict[str, str] = {}
    checked = {p: _check_image(p, inside, real_dirs, decode=False) for p in paths}
    new = [p for p, result in checked.items() if result is None]
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        checked.update(zip(new, pool.map(lambda p: _check_image(p, inside, {}), new), strict=True))
    if new and store is not None:  # only usable images: a bad one may be fixed keeping its mtime
        usable = {p: [key[1], key[2], digest] for p, (why, digest, key) in checked.items() if why is None}
        with contextlib.suppress(OSError):  # no writable cache only costs the next run the decoding
            store.mkdir(parents=True, exist_ok=True)
            data = {"version": CHECKS_VERSION, "folder": str(folder), "images": usable}
            write_json(store / name, data, indent=0)
    return {p: (why, digest) for p, (why, digest, _) in checked.items()}


def _check_image(
    path: str, inside: set[str] | None, real_dirs: dict[str, str], decode: bool = True
) -> tuple[str | None, str, tuple | None] | None:
    """``(problem or None, sha256, (path, size, mtime_ns) or None)``; ``None`` when ``decode`` is
    off and the image would need decoding. ``real_dirs`` memoises the real path of each folder
    (one ``lstat`` per image instead of one per path component)."""
    try:
        stat: os.stat_result | None = os.lstat(path)
    except FileNotFoundError:
        stat = None
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})", "", None
    link = stat is not None and stat_module.S_ISLNK(stat.st_mode)
    if inside is not None and not _is_inside(_real_path(path, link, real_dirs), inside):
        return OUTSIDE, "", None  # a symlink is followed: a link out is outside
    try:
        stat = os.stat(path) if stat is None or link else stat  # a file's lstat is its stat
    except FileNotFoundError:
        return "missing", "", None
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})", "", None
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in _CHECKED:
        if not decode:
            return None
        _CHECKED[key] = _verify(Path(path))
    return (*_CHECKED[key], key)


def _real_path(path: str, link: bool, real_dirs: dict[str, str]) -> str:
    """``os.path.realpath(path)``, from the memoised real path of its folder unless the file is a
    symlink (or its name is ``.``/``..``)."""
    folder, name = os.path.split(path)
    if link or name in ("", ".", ".."):
        return os.path.realpath(path)
    if folder not in real_dirs:
        real_dirs[folder] = os.path.realpath(folder).rstrip(os.sep) + os.sep
    return real_dirs[folder] + name


def _is_inside(real: str, folders: set[str]) -> bool:
    return any(real == f or real.startswith(f.rstrip(os.sep) + os.sep) for f in folders)


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
