"""The encoder-feature cache: a frozen encoder's features, computed once per image, memory-mapped.

The encoder is frozen, so its output for an image never changes while nothing that feeds it
changes. ``FeatureCache.features_for(encoder, dataset)`` returns an array
``[len(dataset), encoder.num_tokens, encoder.feature_dim]`` (float16 by default), computing it the
first time and opening it memory-mapped (``np.load(mmap_mode="r")``) ever after.

The key is a sha256 of everything that changes the features: ``encoder.fingerprint()`` (plugin,
checkpoint, revision, weights, preprocessing, image size), the dtype the encoder computes in,
``dataset.fingerprint`` (which images, in which order), the stored dtype, the feature shape and
``FORMAT_VERSION``. Change any of them and the key changes: a stale cache is never reused, it is
simply not found.

Layout under the root (``cache_dir("features")`` unless given)::

    <key>/features.npy    the features, rows in dataset order
    <key>/meta.json       key components, shape, dtype, count and "complete": true
    <key>.partial/        a run in progress: resumed by the next run, renamed to <key>/ when done
    <key>.lock            held while computing, so concurrent processes compute a key once

A run that is interrupted leaves only ``<key>.partial/``, never a ``<key>/`` that looks complete.
A ``<key>/`` whose files disagree with its ``meta.json`` (a truncated copy, say) is recomputed
with a warning. Under ``torch.distributed`` rank 0 computes while the other ranks wait for it on
the lock; ranks started without a process group (env ``RANK``/``WORLD_SIZE`` only) meet at the
lock too, and whichever gets there first computes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import sys
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmkit.core.contracts import CaptionDataset, VisionEncoder
from vlmkit.core.errors import DataError, VlmkitWarning
from vlmkit.core.paths import cache_dir, write_json
from vlmkit.sdk.datasets import fingerprint

if TYPE_CHECKING:  # pragma: no cover - typing only
    import numpy as np

log = logging.getLogger(__name__)

#: bump when the file layout or the way features are computed changes
FORMAT_VERSION = 1
#: numpy has no bfloat16: float16 halves the disk and page-cache footprint of float32
DTYPES = ("float16", "float32")
#: flush and record progress every this many batches (what an interrupted run can resume from)
CHECKPOINT_EVERY = 16


class CacheWarning(VlmkitWarning):
    """A cache entry was unusable (truncated, inconsistent) and is being recomputed."""


@dataclass(frozen=True)
class CacheKey:
    """Everything the cached features depend on; ``digest`` names the entry."""

    encoder: str
    dataset: str
    dtype: str
    count: int
    num_tokens: int
    feature_dim: int
    #: the dtype the encoder computes in (bfloat16 and float32 weights give different features)
    encoder_dtype: str = "float32"
    format: int = FORMAT_VERSION

    @property
    def digest(self) -> str:
        return fingerprint("vlmkit-features", asdict(self))

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.count, self.num_tokens, self.feature_dim)


class FeatureCache:
    """Frozen-encoder features on disk, keyed by encoder, dataset and dtype.

    ``cache = FeatureCache()``; ``feats = cache.features_for(encoder, dataset)``; ``feats[i]`` is
    the ``[num_tokens, feature_dim]`` features of ``dataset[i]``.
    """

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else cache_dir("features")
        self.root.mkdir(parents=True, exist_ok=True)

    # ----------------------------------------------------------------------------- public

    def key(self, encoder: VisionEncoder, dataset: CaptionDataset, dtype: str = "float16") -> CacheKey:
        if dtype not in DTYPES:
            raise ValueError(f"feature cache dtype must be one of {DTYPES}, got {dtype!r}")
        return CacheKey(
            encoder=str(encoder.fingerprint()),
            dataset=str(dataset.fingerprint),
            dtype=dtype,
            count=len(dataset),
            num_tokens=int(encoder.num_tokens),
            feature_dim=int(encoder.feature_dim),
            encoder_dtype=_encoder_dtype(encoder),
        )

    def path(self, key: CacheKey) -> Path:
        return self.root / key.digest

    def load(
        self, encoder: VisionEncoder, dataset: CaptionDataset, dtype: str = "float16"
    ) -> np.ndarray | None:
        """The cached features when a complete, intact entry exists; else ``None`` (no computing)."""
        return self._open(self.key(encoder, dataset, dtype))

    def features_for(
        self,
        encoder: VisionEncoder,
        dataset: CaptionDataset,
        *,
        dtype: str = "float16",
        batch_size: int = 32,
        num_workers: int = 4,
        progress: bool | None = None,
    ) -> np.ndarray:
        """Features of every example of ``dataset``, read-only and memory-mapped.

        Computes what is missing (resuming an interrupted run) under ``torch.inference_mode``,
        decoding and preprocessing images in background threads (``num_workers``) while the
        encoder runs. ``progress``: show a progress bar (default: when stderr is a terminal).
        """
        key = self.key(encoder, dataset, dtype)
        if key.count == 0:
            raise DataError("feature cache: the dataset is empty")
        args = (key, encoder, dataset, batch_size, num_workers, progress)
        features = self._open(key)
        rank, world, initialized = distributed_info()
        if not (initialized and world > 1):
            return features if features is not None else self._compute_locked(*args)
        import torch.distributed as dist

        # Rank 0 takes the lock before the others, who then queue behind it on the lock rather
        # than in a collective: caching can outlast a barrier's timeout, a flock has none. Where
        # ranks do not share the filesystem, the first rank of each machine computes its own.
        if _all_ranks(features is not None):  # every rank has it already: no lock, no waiting
            return features
        lock = _FileLock(self._lock_path(key))
        if rank == 0:
            with lock:
                dist.barrier()
                features = self._compute_locked(*args, locked=True)
        else:
            dist.barrier()
            features = self._compute_locked(*args)
        return features

    def clear(self) -> int:
        """Remove every entry (complete or partial); returns how many were removed."""
        removed = 0
        for child in self.root.iterdir():
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
                removed += 1
            elif child.suffix == ".lock":
                child.unlink(missing_ok=True)
        return removed

    # ----------------------------------------------------------------------------- internals

    def _lock_path(self, key: CacheKey) -> Path:
        return self.root / f"{key.digest}.lock"

    def _compute_locked(
        self, key, encoder, dataset, batch_size, num_workers, progress, locked: bool = False
    ) -> np.ndarray:
        """Open the entry, computing it first when missing, under the key's lock."""
        with contextlib.nullcontext() if locked else _FileLock(self._lock_path(key)):
            features = self._open(key, quiet=True)  # another process may have finished meanwhile
            if features is None:
                self._compute(key, encoder, dataset, batch_size, num_workers, progress)
                features = self._open(key)
        if features is None:  # pragma: no cover - _compute raises on failure
            raise DataError(f"feature cache: {self.path(key)} is unusable right after writing it")
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

    def _compute(self, key, encoder, dataset, batch_size, num_workers, progress) -> None:
        import numpy as np
        import torch

        final = self.path(key)
        partial = final.with_name(final.name + ".partial")
        features, start = _open_partial(partial, key)
        if start:
            log.info("feature cache: resuming %s at %d of %d images", final.name, start, key.count)
        else:
            log.info("feature cache: computing %d images into %s", key.count, final)

        param = next(iter(encoder.parameters()), None) if hasattr(encoder, "parameters") else None
        was_training = getattr(encoder, "training", False)
        if hasattr(encoder, "eval"):
            encoder.eval()
        done = start
        try:
            with (
                torch.inference_mode(),
                _prefetch(dataset, encoder.preprocess, start, batch_size, num_workers) as batches,
                _progress_bar(key.count, start, progress) as advance,
            ):
                for n_batch, (lo, pixel_values) in enumerate(batches, start=1):
                    if param is not None:
                        pixel_values = pixel_values.to(device=param.device, dtype=param.dtype)
                    out = encoder(pixel_values)
                    hi = lo + pixel_values.shape[0]
                    if tuple(out.shape) != (hi - lo, key.num_tokens, key.feature_dim):
                        raise DataError(
                            f"feature cache: encoder returned features of shape {tuple(out.shape)}, expected "
                            f"{(hi - lo, key.num_tokens, key.feature_dim)} (its num_tokens x feature_dim)"
                        )
                    with np.errstate(over="ignore"):  # overflow is reported just below, in words
                        chunk = out.float().cpu().numpy().astype(key.dtype)
                    if not np.isfinite(chunk).all():
                        raise DataError(
                            f"feature cache: non-finite features for images {lo}..{hi - 1} "
                            f"(in {key.dtype}{'; try dtype float32' if key.dtype == 'float16' else ''})"
                        )
                    features[lo:hi] = chunk
                    done = hi
                    advance(hi - lo)
                    if n_batch % CHECKPOINT_EVERY == 0:
                        _checkpoint(features, partial, key, done)
        except BaseException:
            with contextlib.suppress(Exception):  # keep the original error, whatever happens here
                _checkpoint(features, partial, key, done)  # an interrupted run resumes from here
            raise
        finally:
            if was_training and hasattr(encoder, "train"):
                encoder.train(True)
        features.flush()
        del features
        meta = {**asdict(key), "digest": key.digest, "shape": list(key.shape), "complete": True}
        write_json(partial / "meta.json", meta, indent=1)  # the marker of a complete entry, written last
        (partial / "progress.json").unlink(missing_ok=True)
        if final.exists():  # an unusable entry found by _open: move it aside, then replace it
            stale = final.with_name(f"{final.name}.stale-{os.getpid()}")
            os.replace(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(partial, final)  # atomic: readers see no entry or a complete one


# --------------------------------------------------------------------------------------- helpers


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
    return None


def _open_partial(partial: Path, key: CacheKey) -> tuple[np.ndarray, int]:
    """The memmap to write into and the first row still missing (0 unless resuming)."""
    import numpy as np

    path = partial / "features.npy"
    try:
        progress = json.loads((partial / "progress.json").read_text())
        if progress.get("key") == key.digest and _check_entry_file(path, key):
            return np.load(path, mmap_mode="r+"), int(progress["done"])
    except (OSError, ValueError, KeyError):
        pass
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return np.lib.format.open_memmap(path, mode="w+", dtype=key.dtype, shape=key.shape), 0


def _check_entry_file(path: Path, key: CacheKey) -> bool:
    import numpy as np

    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return arr.shape == key.shape and arr.dtype == np.dtype(key.dtype)


def _checkpoint(features: np.ndarray, partial: Path, key: CacheKey, done: int) -> None:
    features.flush()  # rows first, then the record that they are there
    write_json(partial / "progress.json", {"key": key.digest, "done": done}, indent=1)


@contextlib.contextmanager
def _prefetch(dataset, preprocess, start: int, batch_size: int, num_workers: int) -> Iterator[Iterator]:
    """Yield ``(first index, pixel_values)`` batches, decoding ahead in background threads.

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
            for lo in range(start, len(dataset), batch_size):
                hi = min(lo + batch_size, len(dataset))
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


@contextlib.contextmanager
def _progress_bar(total: int, start: int, enabled: bool | None):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("caching features"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("features", total=total, completed=start)
        yield lambda n: bar.advance(task, n)


class _FileLock:
    """An exclusive ``flock`` on a file, so processes (or ranks) sharing a cache compute a key once.

    Where ``fcntl`` is missing (Windows) it does nothing: two processes may then both compute a
    key, and the second rename simply loses.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def __enter__(self) -> _FileLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


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
