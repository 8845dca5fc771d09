"""Image downloads for hub datasets that name URLs instead of holding images (COCO Karpathy).

``download_images`` fetches many URLs into one folder before training starts:

- parallel: a thread pool (the work is waiting on the network, not the CPU);
- resumable: a file is written as ``<name>.part`` and renamed when complete and checked, so a
  file under its final name is complete; a later run skips it, and continues a ``.part`` with an
  HTTP ``Range`` request (or starts it again when the server ignores the range);
- retried: timeouts, dropped connections, truncated bodies and 5xx answers are tried again with
  exponential backoff; 4xx answers (a missing image) are not;
- timed: a read waits at most ``timeout`` seconds for a byte, and one try of one image takes at
  most ``deadline`` seconds in all (a server trickling bytes never trips the first);
- http(s) only: a ``file://`` or ``ftp://`` URL is not read;
- bounded: a body larger than ``max_bytes`` is refused (from its Content-Length when the server
  sends one, else once that many bytes arrived), and what arrived must decode as an image;
- reported: what failed is left out, listed in full (URL and reason) in ``failed-downloads.tsv``
  in the folder and returned, so the caller says it in one line.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from vlmkit.sdk.datasets import progress_bar

#: a COCO image is ~160 KB; a body this large is not one
MAX_DOWNLOAD_BYTES = 32 * 2**20
FAILURES_FILE = "failed-downloads.tsv"
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class DownloadPolicy:
    workers: int = 16
    retries: int = 3
    #: seconds without a byte before a read gives up
    timeout: float = 30.0
    #: seconds one try of one image may take in all: a server trickling a byte every few seconds
    #: never trips ``timeout``
    deadline: float = 120.0
    backoff: float = 1.0
    max_bytes: int = MAX_DOWNLOAD_BYTES


class _Permanent(Exception):
    """A failure another try would not fix (404, too large, not an image)."""


def file_name(url: str) -> str:
    """The local name of ``url``: its last path segment (COCO names are unique), prefixed by a
    short hash of the whole URL so two URLs never share a file."""
    last = Path(urlsplit(url).path).name or "image"
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in last)[-80:]
    return f"{hashlib.sha256(url.encode()).hexdigest()[:10]}-{safe}"


def download_images(
    urls: Mapping[str, str],
    folder: Path,
    policy: DownloadPolicy = DownloadPolicy(),
    *,
    progress: bool | None = None,
) -> tuple[dict[str, Path], dict[str, str]]:
    """``(id -> local file, id -> why it failed)`` for ``urls`` (``id -> URL``).

    Complete files already in ``folder`` are not fetched again. Failures are also listed in
    ``folder/failed-downloads.tsv``, with those of earlier calls for other URLs (removed when
    none is left)."""
    folder.mkdir(parents=True, exist_ok=True)
    done: dict[str, Path] = {}
    todo: dict[str, str] = {}
    for identity, url in urls.items():
        target = folder / file_name(url)
        if target.is_file():
            done[identity] = target
        else:
            todo[identity] = url
    failed: dict[str, str] = {}
    if todo:
        with (
            progress_bar("downloading images", len(todo), progress) as advance,
            ThreadPoolExecutor(policy.workers) as pool,
        ):
            futures = {
                pool.submit(_fetch, url, folder / file_name(url), policy): i for i, url in todo.items()
            }
            for future in as_completed(futures):
                identity = futures[future]
                try:
                    done[identity] = future.result()
                except Exception as exc:  # noqa: BLE001 - every failure is reported, none stops the rest
                    failed[identity] = " ".join(str(exc).split())[:200] or type(exc).__name__
                advance(1)
    _update_report(folder / FAILURES_FILE, urls, {urls[i]: why for i, why in failed.items()})
    return done, failed


def _update_report(report: Path, asked: Mapping[str, str], failed: Mapping[str, str]) -> None:
    """The failures of this call in ``report``, beside those of earlier calls for other URLs: the
    train split's warning still points at its failures once the validation split has downloaded."""
    listed: dict[str, str] = {}
    if report.is_file():
        for line in report.read_text().splitlines()[1:]:
            url, _, why = line.partition("\t")
            listed[url] = why
    for url in asked.values():  # their state is this call's
        listed.pop(url, None)
    listed.update(failed)
    if listed:
        lines = [f"{url}\t{why}\n" for url, why in sorted(listed.items())]
        report.write_text("url\tproblem\n" + "".join(lines))
    else:
        report.unlink(missing_ok=True)


def _fetch(url: str, target: Path, policy: DownloadPolicy) -> Path:
    partial = target.with_name(target.name + ".part")
    for attempt in range(policy.retries + 1):
        try:
            _fetch_once(url, partial, policy)
            _check_image(partial)
            partial.replace(target)
            return target
        except _Permanent:
            partial.unlink(missing_ok=True)
            raise
        except (OSError, ValueError, http.client.HTTPException) as exc:  # timeouts, resets, 5xx, truncation
            if attempt == policy.retries:
                raise OSError(f"{_reason(exc)} (after {policy.retries + 1} tries)") from exc
            time.sleep(policy.backoff * 2**attempt)
    raise AssertionError("unreachable")  # pragma: no cover


def _fetch_once(url: str, partial: Path, policy: DownloadPolicy) -> None:
    give_up = time.monotonic() + policy.deadline
    if urlsplit(url).scheme.lower() not in ("http", "https"):  # urlopen would read file:// and ftp:// too
        raise _Permanent("is not an http(s) URL (not read)")
    have = partial.stat().st_size if partial.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=policy.timeout)  # noqa: S310 - http(s) URLs of a dataset
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the range starts at the end: the part file is complete
            return
        if 400 <= exc.code < 500:
            raise _Permanent(f"HTTP {exc.code} {exc.reason}") from None
        raise OSError(f"HTTP {exc.code} {exc.reason}") from None
    with response:
        resumed = response.status == 206
        length = response.headers.get("Content-Length")
        expected = int(length) + (have if resumed else 0) if length and length.isdigit() else None
        if expected is not None and expected > policy.max_bytes:
            raise _Permanent(f"is {expected} bytes, over the {policy.max_bytes} byte limit")
        written = have if resumed else 0
        with open(partial, "ab" if resumed else "wb") as f:
            while chunk := response.read1(_CHUNK):  # what has arrived, not a full chunk's wait
                if time.monotonic() > give_up:
                    raise OSError(f"took over {policy.deadline:g} s (the server sends too slowly)")
                written += len(chunk)
                if written > policy.max_bytes:
                    raise _Permanent(f"is over the {policy.max_bytes} byte limit")
                f.write(chunk)
    if expected is not None and written < expected:
        raise OSError(f"truncated: {written} of {expected} bytes")


def _check_image(path: Path) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(path.read_bytes())) as image:
            image.verify()
    except (UnidentifiedImageError, SyntaxError, OSError, ValueError) as exc:
        raise _Permanent(f"is not an image ({_reason(exc)})") from None


def _reason(exc: BaseException) -> str:
    text = str(getattr(exc, "reason", "") or exc) or type(exc).__name__
    return " ".join(text.split())[:160]
