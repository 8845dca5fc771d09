"""``captions-csv``: images and captions listed in a CSV file.

The file has a header row with a ``caption`` column and a ``path`` or a ``url`` column (or both:
each row fills one; a row that fills both uses its local ``path``)::

    path,url,caption
    photos/dog.jpg,,A dog runs along the beach.
    photos/dog.jpg,,A brown dog at the seaside.
    ,https://example.org/cat.png,A cat sleeps on a bench.

- ``path`` is relative to ``image_root`` (default: the CSV's folder) or absolute. Missing local
  files are reported when the dataset loads, all at once, never mid-training.
- ``url`` images are downloaded lazily, on first use, into ``download_dir`` (default
  ``$VLMKIT_HOME/downloads/captions-csv``), and read from there afterwards. Without a network the
  download fails with a ``DataError`` naming the URL. A URL is taken to name fixed content: to
  change an image, change its URL.
- Several rows naming one image give that image several reference captions.

Splits are seeded and disjoint: each image's split comes from a hash of its identity (the
``path`` as written, else the ``url``) and the seed, so adding rows never moves an existing image
to another split.
"""

from __future__ import annotations

import csv
import hashlib
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field
from vlmkit import (
    DEFAULT_FRACTIONS,
    CaptionExample,
    DataError,
    DatasetSpec,
    ListDataset,
    SplitFractions,
    assign_split,
    check_split,
    fingerprint,
    parse_options,
)

#: bump when how rows become examples changes, so feature caches of the old examples are not reused
FORMAT_VERSION = 1


class CaptionsCsvOptions(BaseModel):
    """Options of the ``captions-csv`` dataset (``--dataset captions-csv:path=captions.csv``)."""

    model_config = ConfigDict(extra="forbid")

    # descriptions show in `vlmkit plugins show captions-csv`
    path: Path = Field(description="the CSV file")
    image_root: Path | None = Field(
        None, description="folder that relative 'path' cells are relative to (default: the CSV's folder)"
    )
    download_dir: Path | None = Field(
        None,
        description="where downloaded 'url' images are kept (default $VLMKIT_HOME/downloads/captions-csv)",
    )
    timeout: float = Field(30.0, gt=0, description="seconds to wait for one download")
    split_fractions: SplitFractions = Field(
        DEFAULT_FRACTIONS,
        description="train/validation/test fractions; an image's split comes from a hash of its identity",
    )


#: a download larger than this is refused (an image is a few MB; a bigger answer is not one)
MAX_DOWNLOAD_BYTES = 32 * 2**20


@dataclass(frozen=True)
class UrlImage:
    """An image downloaded on first use and kept on disk.

    A picklable zero-argument callable (``CaptionExample.image``), so DataLoader workers can
    carry it.
    """

    url: str
    download_dir: str | None
    timeout: float

    def __call__(self):
        from PIL import Image

        file = self.local_file()
        if not file.is_file():
            self._download(file)
        image = Image.open(file)
        image.load()
        return image

    def local_file(self) -> Path:
        folder = Path(self.download_dir).expanduser() if self.download_dir else _default_download_dir()
        suffix = Path(urlparse(self.url).path).suffix.lower()
        digest = hashlib.sha256(self.url.encode()).hexdigest()[:24]
        return folder / f"{digest}{suffix if len(suffix) <= 5 else ''}"

    def _download(self, file: Path) -> None:
        import urllib.request

        file.parent.mkdir(parents=True, exist_ok=True)
        try:
            with urllib.request.urlopen(self.url, timeout=self.timeout) as response:  # noqa: S310
                data = response.read(MAX_DOWNLOAD_BYTES + 1)  # never the whole of a runaway response
        except (OSError, ValueError) as exc:  # URLError, timeouts and refused connections are OSErrors
            reason = getattr(exc, "reason", None) or exc
            raise DataError(
                f"captions-csv: cannot download {self.url} ({reason}). Offline? Download the images and "
                "list them in a 'path' column instead"
            ) from exc
        if len(data) > MAX_DOWNLOAD_BYTES:
            raise DataError(
                f"captions-csv: {self.url} is over {MAX_DOWNLOAD_BYTES:,} bytes, too large for an image; "
                "download it yourself and list it in a 'path' column"
            )
        # write then rename: an interrupted download never leaves a truncated image behind
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=".download-")
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, file)


class CaptionsCsvDataset(DatasetSpec):
    name: ClassVar[str] = "captions-csv"
    description: ClassVar[str] = (
        "Images (local paths or URLs, fetched lazily) with captions from a CSV file (option path=...)"
    )
    options: ClassVar[type[BaseModel]] = CaptionsCsvOptions

    def load(self, split: str, options: Mapping[str, Any] | None = None, *, seed: int = 0) -> ListDataset:
        opts: CaptionsCsvOptions = parse_options(self, options)
        csv_file = opts.path.expanduser().resolve()
        source = f"captions-csv {csv_file}"
        check_split(split, source)
        rows = _read_rows(csv_file, source)
        root = (opts.image_root or csv_file.parent).expanduser()

        captions: dict[str, list[str]] = {}
        images: dict[str, Any] = {}
        stamps: dict[str, Any] = {}
        missing = []
        for line, path, url, caption in rows:
            identity = path or url
            if identity not in images:
                if path:
                    file = Path(path) if Path(path).is_absolute() else root / path
                    try:
                        stat = file.stat()
                    except OSError:
                        missing.append(f"{path} (line {line})")
                        stat = None
                    images[identity] = str(file)
                    # size and modification time stand in for the content: a changed file gets
                    # a new fingerprint, so its cached features are recomputed
                    stamps[identity] = [stat.st_size, stat.st_mtime_ns] if stat else None
                else:
                    images[identity] = UrlImage(
                        url, str(opts.download_dir) if opts.download_dir else None, opts.timeout
                    )
                    stamps[identity] = url
            captions.setdefault(identity, []).append(caption)
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise DataError(
                f"{source}: {len(missing)} image file(s) not found under {root}: {', '.join(missing[:3])}{more}"
            )

        examples, digests = [], []
        for identity in sorted(images):
            if assign_split(identity, seed, opts.split_fractions) != split:
                continue
            examples.append(CaptionExample(id=identity, captions=captions[identity], image=images[identity]))
            digests.append([identity, stamps[identity], captions[identity]])
        if not examples:
            raise DataError(
                f"{source}: split {split!r} is empty ({len(images)} images, split_fractions="
                f"{list(opts.split_fractions)}); add rows or change split_fractions"
            )
        fp = fingerprint("captions-csv", FORMAT_VERSION, split, seed, digests)
        return ListDataset(examples, fp, name=self.name, info={"split": split, "csv": str(csv_file)})


def _read_rows(csv_file: Path, source: str) -> list[tuple[int, str, str, str]]:
    """``(line, path, url, caption)`` for every data row; ``DataError`` naming the first bad one."""
    if not csv_file.is_file():
        raise DataError(f"{source}: no such file")
    with csv_file.open(newline="", encoding="utf-8-sig") as fh:  # utf-8-sig: spreadsheets write a BOM
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in reader.fieldnames or []]
        if "caption" not in columns or not {"path", "url"} & set(columns):
            raise DataError(
                f"{source}: needs a header with a 'caption' column and a 'path' or 'url' column; "
                f"found {', '.join(columns) or 'no header'}"
            )
        rows = []
        for record in reader:
            cells = {(k or "").strip(): (v or "").strip() for k, v in record.items()}
            line = reader.line_num
            if not any(cells.values()):
                continue  # blank line
            path, url, caption = cells.get("path", ""), cells.get("url", ""), cells.get("caption", "")
            if not (path or url):
                raise DataError(f"{source}: line {line} has neither a path nor a url")
            if not caption:
                raise DataError(f"{source}: line {line} has no caption")
            rows.append((line, path, url, caption))
    if not rows:
        raise DataError(f"{source}: lists no images")
    return rows


def _default_download_dir() -> Path:
    from vlmkit import cache_dir

    return cache_dir("downloads", "captions-csv")
