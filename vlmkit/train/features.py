"""The encoder-feature cache: a frozen encoder's features, computed once per image, memory-mapped.

The encoder is frozen, so its output for an image never changes while nothing that feeds it
changes. ``FeatureCache.features_for(encoder, dataset, projection=...)`` returns an array
``[len(dataset), K, D]`` (float16 by default), computing it the first time and opening it
memory-mapped (``np.load(mmap_mode="r")``) ever after.

What is stored is what training uses: the projection's token reduction (``avgpool``,
``pixel_shuffle``) has no parameters and runs before anything trains, so it runs here, before
storing. A SigLIP-base run pooled to 16 tokens stores 16 x 768 per image, not 196 x 768 (12x less
disk, page cache and host-to-device traffic); the projection sees features with K tokens and does
not reduce them again.

Features are computed on ``device`` (the training device) in batches, with a progress bar, in
the dtype of the encoder's weights, with no autocast and no TF32: ``vlmkit train`` keeps the
frozen encoder in float32 whatever the run's precision, so one entry serves fp32, bf16 and fp16
runs alike (the precision of a run is not part of what it trains on). They are stored in float16
(``dtype``), which keeps more of each value than a bf16 computation would.

The key is a sha256 of everything that changes the features: ``encoder.fingerprint()`` (plugin,
checkpoint, revision, weights, preprocessing, image size; not the dtype the weights were cast to),
the dtype the encoder computes in, the reduction (kind, tokens, factor), ``dataset.fingerprint``
(which images, in which order), the stored dtype, the stored shape and ``FORMAT_VERSION``. Change
any of them and the key changes: a stale cache is never reused, it is simply not found.

Layout under the root (``cache_dir("features")`` unless given)::

    <key>/features.npy               the features, rows in dataset order
    <key>/meta.json                  key components, shape, dtype, count, the sha256 of
                                     features.npy and "complete": true
    <key>/verified.json              features.npy's inode, size and mtime when its sha256 last
                                     matched: the file is hashed again only once it changes
    <key>.partial/rows-<lo>-<hi>/    a run in progress: the rows lo..hi-1 (features.npy and
                                     progress.json), resumed by the next run
    <key>.lock                       held while one process computes (see below)

A run that is interrupted leaves only ``<key>.partial/``, never a ``<key>/`` that looks complete.
A ``<key>/`` whose files disagree with its ``meta.json`` (a truncated copy, say, or bytes changed
in place: the checksum) is recomputed with a warning.

Under ``torch.distributed`` (torchrun, accelerate) the rows are split across ranks: each rank
computes its share on its own device into ``rows-<lo>-<hi>/`` of the shared cache folder; once
every rank reports (an ``all_gather``, not a file lock: ``flock`` is node-local or missing on
cluster file systems) rank 0 assembles the entry and the ranks open it. The cache folder must be
shared by all ranks: each rank writes a marker with a random token first, and a rank that does not
see another's marker stops every rank with a one-line error instead of waiting for a timeout.
Processes without a process group (two runs on one machine, or ``RANK``/``WORLD_SIZE`` only)
meet at the ``flock`` and whichever gets there first computes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import secrets
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmkit.core.contracts import CaptionDataset, VisionEncoder
from vlmkit.core.errors import DataError, VlmkitError, VlmkitWarning
from vlmkit.core.paths import FileLock, cache_dir, make_dirs, write_json, writing
from vlmkit.core.progress import progress_bar
from vlmkit.core.projection import ProjectionConfig
from vlmkit.core.ranks import preparation_group
from vlmkit.sdk.datasets import IMAGE_CHECKS, fingerprint

if TYPE_CHECKING:  # pragma: no cover - typing only
    import numpy as np

log = logging.getLogger(__name__)

#: bump when the file layout or the way features are computed changes (2: reduced before storing;
#: 3: never under autocast or TF32; 4: meta.json holds the sha256 of features.npy)
FORMAT_VERSION = 4
#: numpy has no bfloat16: float16 halves the disk and page-cache footprint of float32
DTYPES = ("float16", "float32")
#: flush and record progress every this many batches (what an interrupted run can resume from)
CHECKPOINT_EVERY = 16
#: how long a rank looks for the markers of the others (network file systems list new files late)
SHARED_FOLDER_WAIT_S = 5.0


class CacheWarning(VlmkitWarning):
    """A cache entry was unusable (truncated, inconsistent) and is being recomputed."""


@dataclass(frozen=True)
class CacheKey:
    """Everything the cached features depend on; ``digest`` names the entry."""

    encoder: str
    dataset: str
    dtype: str
    count: int
    #: the stored shape per image: after the token reduction
    num_tokens: int
    feature_dim: int
    #: the dtype the encoder computes in (bfloat16 and float32 weights give different features)
    encoder_dtype: str = "float32"
    #: the parameter-free token reduction applied before storing: none, avgpool:<tokens>, pixel_shuffle:<factor>
    reduction: str = "none"
    format: int = FORMAT_VERSION

    @property
    def digest(self) -> str:
        return fingerprint("vlmkit-features", asdict(self))

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.count, self.num_tokens, self.feature_dim)


@dataclass
class _Run:
    """One computation: what to compute and how."""

    key: CacheKey
    encoder: Any
    dataset: Any
    projection: ProjectionConfig | None
    batch_size: int
    num_workers: int
    progress: bool | None
    device: Any


class FeatureCache:
    """Frozen-encoder features on disk, keyed by encoder, dataset, reduction and dtype.

    ``cache = FeatureCache()``; ``feats = cache.features_for(encoder, dataset)``; ``feats[i]`` is
    the ``[K, D]`` features of ``dataset[i]``.
    """

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = make_dirs(Path(root).expanduser()) if root is not None else cache_dir("features")

    # ----------------------------------------------------------------------------- public

    def key(
        self,
        encoder: VisionEncoder,
        dataset: CaptionDataset,
        dtype: str = "float16",
        *,
        projection: ProjectionConfig | None = None,
    ) -> CacheKey:
        if dtype not in DTYPES:
            raise ValueError(f"feature cache dtype must be one of {DTYPES}, got {dtype!r}")
        tokens, dim, reduction = int(encoder.num_tokens), int(encoder.feature_dim), "none"
        if projection is not None and projection.reduction != "none":
            tokens = projection.output_tokens(tokens, encoder.grid)
            if projection.reduction == "avgpool":
                reduction = f"avgpool:{projection.tokens}"
            else:
                reduction, dim = f"pixel_shuffle:{projection.factor}", dim * projection.factor**2
        return CacheKey(
            encoder=str(encoder.fingerprint()),
            dataset=str(dataset.fingerprint),
            dtype=dtype,
            count=len(dataset),
            num_tokens=tokens,
            feature_dim=dim,
            encoder_dtype=_encoder_dtype(encoder),
            reduction=reduction,
        )

    def path(self, key: CacheKey) -> Path:
        return self.root / key.digest

    def load(
        self,
        encoder: VisionEncoder,
        dataset: CaptionDataset,
        dtype: str = "float16",
        *,
        projection: ProjectionConfig | None = None,
    ) -> np.ndarray | None:
        """The cached features when a complete, intact entry exists; else ``None`` (no computing)."""
        return self._open(self.key(encoder, dataset, dtype, projection=projection))

    def features_for(
        self,
        encoder: VisionEncoder,
        dataset: CaptionDataset,
        *,
        dtype: str = "float16",
        projection: ProjectionConfig | None = None,
        device: Any = None,
        batch_size: int = 32,
        num_workers: int = 4,
        progress: bool | None = None,
    ) -> np.ndarray:
        """Features of every example of ``dataset``, read-only and memory-mapped.

        Computes what is missing (resuming an interrupted run) under ``torch.inference_mode`` on
        ``device`` (default: where the encoder is; it is moved there and back), in the dtype of the
        encoder's weights (no autocast, no TF32), decoding and preprocessing images in
        background threads (``num_workers``) while the encoder runs. ``projection``: store the
        features after its token reduction. ``progress``: show a progress bar (default: when
        stderr is a terminal; on rank 0 only).
        """
        key = self.key(encoder, dataset, dtype, projection=projection)
        if key.count == 0:
            raise DataError("feature cache: the dataset is empty")
        run = _Run(key, encoder, dataset, projection, batch_size, num_workers, progress, device)
        features = self._open(key)
        rank, world, initialized = distributed_info()
        if not (initialized and world > 1):
            return features if features is not None else self._compute_locked(run)
        if _all_ranks(features is not None):  # every rank has it already: nobody computes
            return features
        return self._compute_distributed(run, rank, world)

    def clear(self) -> int:
        """Remove every entry (complete or partial); returns how many were removed. Remembered image
        checks kept beside the entries (``vlmkit train --cache-dir``) stay."""
        removed = 0
        for child in self.root.iterdir():
            if child.is_dir() and child.name != IMAGE_CHECKS:
                shutil.rmtree(child, ignore_errors=True)
                removed += 1
            elif child.suffix == ".lock":
                child.unlink(missing_ok=True)
        return removed

    # ----------------------------------------------------------------------------- internals

    def _lock_path(self, key: CacheKey) -> Path:
        return self.root / f"{key.digest}.lock"

    def _partial(self, key: CacheKey) -> Path:
        return self.root / f"{key.digest}.partial"

    def _compute_locked(self, run: _Run) -> np.ndarray:
        """Open the entry, computing it first when missing, under the key's lock."""
        with FileLock(self._lock_path(run.key)):
            features = self._open(run.key, quiet=True)  # another process may have finished meanwhile
            if features is None:
                shard = self._compute_rows(run, 0, run.key.count)
                self._assemble(run.key, [shard])
                features = self._open(run.key)
        if features is None:  # pragma: no cover - _assemble raises on failure
            raise DataError(f"feature cache: {self.path(run.key)} is unusable right after writing it")
        return features

    def _compute_distributed(self, run: _Run, rank: int, world: int) -> np.ndarray:
        """Each rank computes its share of the rows; rank 0 assembles once all are done."""
        import torch.distributed as dist

        check_shared_folder(self.root, rank, world)
        n = run.key.count
        bounds = [(r * n // world, (r + 1) * n // world) for r in range(world)]
        lo, hi = bounds[rank]
        failure = None
        try:
            if hi > lo:
                self._compute_rows(run, lo, hi, progress=run.progress if rank == 0 else False)
        except Exception as exc:  # noqa: BLE001 - every rank must reach the gather below, then raise
            failure = exc
        outcomes: list[Any] = [None] * world
        # waits for the slowest rank's share: longer than the default group's timeout on a big dataset
        group = preparation_group()
        dist.all_gather_object(outcomes, None if failure is None else f"rank {rank}: {failure}", group=group)
        if failure is not None:
            raise failure
        if failed := [o for o in outcomes if o]:
            raise DataError(f"feature cache: {failed[0]}")
        problem = None
        if rank == 0:
            try:
                shards = [self._partial(run.key) / f"rows-{a}-{b}" for a, b in bounds if b > a]
                self._assemble(run.key, shards)
            except Exception as exc:  # noqa: BLE001 - told to every rank
                problem = str(exc)
        box = [problem]
        dist.broadcast_object_list(box, src=0, group=group)
        if box[0] is not None:
            raise DataError(f"feature cache: rank 0 could not assemble {self.path(run.key)}: {box[0]}")
        features = self._open(run.key)
        if features is None:
            raise DataError(f"feature cache: rank {rank} cannot open {self.path(run.key)} that rank 0 wrote")
        return features

    def _open(self, key: CacheKey, quiet: bool = False) -> np.ndarray | None:
        import numpy as np

        entry = self.path(key)
        meta_path = entry / "meta.json"
        if not meta_path.is_file():
            return None
        problem = _check_entry(entry, key)
        if problem is None:
            try:
                return np.load(entry / "features.npy", mmap_mode="r")
            except (OSError, ValueError) as exc:
                problem = f"cannot open features.npy ({exc})"
        if not quiet:
            warnings.warn(
                f"feature cache: {entry} is unusable ({problem}); recomputing it", CacheWarning, stacklevel=3
            )
        return None

    def _compute_rows(self, run: _Run, lo: int, hi: int, progress: bool | None = None) -> Path:
        """Compute rows ``lo..hi-1`` into ``<key>.partial/rows-<lo>-<hi>/`` (resuming); its folder."""
        import numpy as np
        import torch

        key = run.key
        shard = self._partial(key) / f"rows-{lo}-{hi}"
        features, start = _open_partial(shard, key, hi - lo)
        if start == hi - lo:
            return shard
        if start:
            log.info("feature cache: resuming %s at %d of %d images", shard, lo + start, hi)
        else:
            log.info("feature cache: computing images %d..%d into %s", lo, hi - 1, shard)
        encoder = run.encoder
        param = next(iter(encoder.parameters()), None) if hasattr(encoder, "parameters") else None
        home = param.device if param is not None else torch.device("cpu")
        device = torch.device(run.device) if run.device is not None else home
        if device != home:
            encoder.to(device)
        was_training = getattr(encoder, "training", False)
        if hasattr(encoder, "eval"):
            encoder.eval()
        expected = (encoder.num_tokens, encoder.feature_dim)
        done = start
        try:
            with (
                torch.inference_mode(),
                # a run's autocast (bf16 training) and TF32 must not reach the features: the key
                # does not hold the run's precision, so the features must not depend on it
                torch.autocast(device.type, enabled=False),
                _no_tf32(),
                _prefetch(
                    run.dataset, encoder.preprocess, lo + start, hi, run.batch_size, run.num_workers
                ) as batches,
                progress_bar(
                    "caching features", hi - lo, run.progress if progress is None else progress, start=start
                ) as advance,
            ):
                for n_batch, (first, pixel_values) in enumerate(batches, start=1):
                    dtype = param.dtype if param is not None else pixel_values.dtype
                    out = encoder(pixel_values.to(device=device, dtype=dtype))
                    b = pixel_values.shape[0]
                    if tuple(out.shape) != (b, *expected):
                        raise DataError(
                            f"feature cache: encoder returned features of shape {tuple(out.shape)}, expected "
                            f"{(b, *expected)} (its num_tokens x feature_dim)"
                        )
                    out = out.float()
                    if run.projection is not None and run.projection.reduction != "none":
                        from vlmkit.core.projection import reduce_tokens

                        out = reduce_tokens(out, run.projection, encoder.grid)
                    with np.errstate(over="ignore"):  # overflow is reported just below, in words
                        chunk = out.cpu().numpy().astype(key.dtype)
                    if not np.isfinite(chunk).all():
                        raise DataError(
                            f"feature cache: non-finite features for images {first}..{first + b - 1} "
                            f"(in {key.dtype}{'; try dtype float32' if key.dtype == 'float16' else ''})"
                        )
                    features[first - lo : first - lo + b] = chunk
                    done = first - lo + b
                    advance(b)
                    if n_batch % CHECKPOINT_EVERY == 0:
                        _checkpoint(features, shard, key, done)
        except BaseException:
            with contextlib.suppress(Exception):  # keep the original error, whatever happens here
                _checkpoint(features, shard, key, done)  # an interrupted run resumes from here
            raise
        finally:
            if was_training and hasattr(encoder, "train"):
                encoder.train(True)
            if device != home:
                encoder.to(home)
        _checkpoint(features, shard, key, done)
        del features
        return shard

    def _assemble(self, key: CacheKey, shards: list[Path]) -> None:
        """The complete entry from the row shards, in row order: moved when there is one, copied
        into one file when there are several; then published with an atomic rename."""
        final, partial = self.path(key), self._partial(key)
        with writing(final):
            self._assemble_in(key, shards, final, partial)

    def _assemble_in(self, key: CacheKey, shards: list[Path], final: Path, partial: Path) -> None:
        import numpy as np

        target = partial / "features.npy"
        if len(shards) == 1:
            os.replace(shards[0] / "features.npy", target)
        else:
            out = _allocated_memmap(target, key.dtype, key.shape)
            row = 0
            for shard in shards:
                part = np.load(shard / "features.npy", mmap_mode="r")
                for i in range(0, len(part), 4096):  # bounded memory, whatever the shard's size
                    out[row + i : row + i + len(part[i : i + 4096])] = part[i : i + 4096]
                row += len(part)
            if row != key.count:
                raise DataError(f"feature cache: the shards hold {row} rows, expected {key.count}")
            out.flush()
            del out
        for child in partial.iterdir():  # this run's shards and any left by another world size
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
        meta = {
            **asdict(key),
            "digest": key.digest,
            "shape": list(key.shape),
            "sha256": _file_sha256(target),
            "complete": True,
        }
        _write_verified(partial, target, meta["sha256"])
        write_json(partial / "meta.json", meta, indent=1)  # the marker of a complete entry, written last
        if final.exists():  # an unusable entry found by _open: move it aside, then replace it
            stale = final.with_name(f"{final.name}.stale-{os.getpid()}")
            os.replace(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(partial, final)  # atomic: readers see no entry or a complete one


def check_shared_folder(root: Path, rank: int, world: int) -> None:
    """Raise ``DataError`` on every rank unless every rank sees the files every other rank writes
    in ``root``: each writes a marker named by a random token, the tokens are gathered, and each
    rank looks for all of them (for up to ``SHARED_FOLDER_WAIT_S``: network file systems list new
    files late)."""
    import torch.distributed as dist

    token = secrets.token_hex(8)
    marker = root / f".rank-check-{token}"
    marker.write_text(str(rank))
    tokens: list[Any] = [None] * world
    dist.all_gather_object(tokens, token)  # every marker is written before any rank gets here
    deadline = time.monotonic() + SHARED_FOLDER_WAIT_S
    while missing := [r for r, t in enumerate(tokens) if not (root / f".rank-check-{t}").is_file()]:
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    reports: list[Any] = [None] * world
    dist.all_gather_object(reports, missing)
    marker.unlink(missing_ok=True)
    for r, unseen in enumerate(reports):
        if unseen:
            raise DataError(
                f"feature cache: rank {r} cannot see the files rank {unseen[0]} wrote in {root}; under "
                "torchrun every rank must share the cache folder (set cache_dir to a shared file system)"
            )


# --------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    import torch

    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _encoder_dtype(encoder: Any) -> str:
    param = next(iter(encoder.parameters()), None) if hasattr(encoder, "parameters") else None
    return str(param.dtype).removeprefix("torch.") if param is not None else "float32"


def _check_entry(entry: Path, key: CacheKey) -> str | None:
    """Why ``entry`` cannot be used for ``key``, or ``None`` when it can."""
    import numpy as np

    try:
        meta = json.loads((entry / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        return f"unreadable meta.json ({exc})"
    if not meta.get("complete"):
        return "meta.json does not mark it complete"
    if meta.get("digest") != key.digest or meta.get("shape") != list(key.shape):
        return "meta.json describes other features"
    path = entry / "features.npy"
    try:
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(f)
            header = f.tell()
        size = path.stat().st_size
    except (OSError, ValueError) as exc:
        return f"unreadable features.npy ({exc})"
    if tuple(shape) != key.shape or np.dtype(dtype) != np.dtype(key.dtype) or fortran:
        return f"features.npy holds {dtype} {tuple(shape)}, expected {key.dtype} {key.shape}"
    expected = header + int(np.prod(shape)) * np.dtype(dtype).itemsize
    if size != expected:
        return f"features.npy is {size} bytes, expected {expected} (truncated or padded)"
    return _check_sum(entry, path, meta.get("sha256"))


#: beside features.npy: the file's identity (inode, size, mtime) when its sha256 last matched
VERIFIED_FILE = "verified.json"


def _check_sum(entry: Path, features: Path, sha256: Any) -> str | None:
    """Whether ``features`` still holds what was written: its sha256 against meta.json's. Hashing
    gigabytes on every open would cost seconds, so the hash is checked on the first open of the
    file as it is now (written, copied, replaced: a new inode or mtime) and remembered for it."""
    if not isinstance(sha256, str):
        return "meta.json has no checksum (written by an older vlmkit)"
    try:
        stamp = json.loads((entry / VERIFIED_FILE).read_text())
    except (OSError, ValueError):
        stamp = None
    if stamp == {"file": _identity(features), "sha256": sha256}:
        return None
    try:
        actual = _file_sha256(features)
    except OSError as exc:
        return f"unreadable features.npy ({exc.strerror or exc})"
    if actual != sha256:
        return (
            "features.npy does not match the checksum in meta.json (changed or damaged since it was written)"
        )
    with contextlib.suppress(VlmkitError):  # a read-only cache still opens, verified each time
        _write_verified(entry, features, sha256)
    return None


def _identity(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_ino, stat.st_size, stat.st_mtime_ns]


def _write_verified(entry: Path, features: Path, sha256: str) -> None:
    write_json(entry / VERIFIED_FILE, {"file": _identity(features), "sha256": sha256}, indent=1)


def _file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()


def _open_partial(shard: Path, key: CacheKey, rows: int) -> tuple[np.ndarray, int]:
    """The memmap of ``rows`` rows to write into and the first row still missing (0 unless resuming)."""
    import numpy as np

    path = shard / "features.npy"
    shape = (rows, key.num_tokens, key.feature_dim)
    try:
        progress = json.loads((shard / "progress.json").read_text())
        arr = np.load(path, mmap_mode="r+")
        if progress.get("key") == key.digest and arr.shape == shape and arr.dtype == np.dtype(key.dtype):
            return arr, min(int(progress["done"]), rows)
    except (OSError, ValueError, KeyError):
        pass
    shutil.rmtree(shard, ignore_errors=True)
    make_dirs(shard)
    return _allocated_memmap(path, key.dtype, shape), 0


def _allocated_memmap(path: Path, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A new ``.npy`` file, memory-mapped for writing, with every byte allocated on disk first.

    ``open_memmap`` makes a sparse file: the disk blocks are found only as rows are written into
    the mapping, and when the disk is full then, the process dies of SIGBUS with no message.
    Allocated up front (``posix_fallocate``), a full disk is an ``ENOSPC`` here: one line."""
    import errno

    import numpy as np

    with writing(path):
        array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        fd = os.open(path, os.O_RDWR)
        try:
            if hasattr(os, "posix_fallocate"):  # not on macOS: APFS allocates as it writes
                os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system that cannot: as before
                return array
            del array
            path.unlink(missing_ok=True)  # not a sparse file of the full size left behind
            raise
        finally:
            os.close(fd)
    return array


def _checkpoint(features: np.ndarray, partial: Path, key: CacheKey, done: int) -> None:
    with writing(partial / "features.npy"):
        features.flush()  # rows first, then the record that they are there
    write_json(partial / "progress.json", {"key": key.digest, "done": done}, indent=1)


@contextlib.contextmanager
def _prefetch(
    dataset, preprocess, start: int, stop: int, batch_size: int, num_workers: int
) -> Iterator[Iterator]:
    """Yield ``(first index, pixel_values)`` batches of ``start..stop-1``, decoding ahead in
    background threads.

    Image decoding (PIL releases the GIL) and preprocessing overlap with the encoder's forward;
    at most two batches wait in memory.
    """
    done = threading.Event()
    batches: queue.Queue = queue.Queue(maxsize=2)
    pool = ThreadPoolExecutor(max_workers=max(1, num_workers), thread_name_prefix="vlmkit-decode")

    def put(item) -> bool:
        while not done.is_set():
            try:
                batches.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for lo in range(start, stop, batch_size):
                hi = min(lo + batch_size, stop)
                images = list(pool.map(lambda i: dataset[i].load_image(), range(lo, hi)))
                if not put((lo, preprocess(images))):
                    return
            put(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put(exc)

    def consume() -> Iterator:
        while True:
            item = batches.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    producer = threading.Thread(target=produce, name="vlmkit-prefetch", daemon=True)
    producer.start()
    try:
        yield consume()
    finally:
        done.set()
        producer.join(timeout=10)
        pool.shutdown(wait=False, cancel_futures=True)


def _all_ranks(flag: bool) -> bool:
    """Whether ``flag`` is true on every rank of the process group."""
    import torch
    import torch.distributed as dist

    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    value = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def distributed_info() -> tuple[int, int, bool]:
    """``(rank, world_size, process group initialized)``.

    From ``torch.distributed`` when a process group exists, else from the ``RANK`` and
    ``WORLD_SIZE`` variables that ``torchrun`` and ``accelerate launch`` set.
    """
    if "torch" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size(), True
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), False
