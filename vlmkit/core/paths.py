"""Where vlmkit keeps derived files (converted checkpoints, feature caches), writing files so that
a reader never sees half of one, turning the operating system's refusals to write (a full disk, a
read-only folder, a file in the way) into one line naming the path, and reading the JSON manifests
of the folders it writes."""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

#: what to do about the usual reasons a write fails, by errno
_WRITE_HINTS = {
    errno.ENOSPC: "the disk is full: free some space or write elsewhere",
    errno.EDQUOT: "the disk quota is used up: free some space or write elsewhere",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.EACCES: "no permission to write there: write elsewhere",
    errno.EPERM: "no permission to write there: write elsewhere",
    errno.ENOTDIR: "a file stands where a folder is needed: move it or write elsewhere",
    errno.EEXIST: "a file stands where a folder is needed: move it or write elsewhere",
    errno.EISDIR: "a folder stands where a file is needed: move it or write elsewhere",
    errno.EFBIG: "the file is larger than the file system (or the file-size limit) allows",
}


def write_problem(path: str | Path, exc: BaseException) -> str | None:
    """``cannot write PATH: <the OS's reason>; <what to do>`` for an OS error from writing ``path``
    (also one from a library that reports it in words: safetensors says ``(os error 28)``);
    ``None`` when ``exc`` is not an OS error."""
    code = exc.errno if isinstance(exc, OSError) else None
    reason = (exc.strerror or str(exc)) if isinstance(exc, OSError) else None
    if code is None and (found := re.search(r"\(os error (\d+)\)", str(exc))):
        code = int(found.group(1))
    elif code is None and _no_room(Path(path)):
        # torch.save reports a full disk as "iostream error" or "unexpected pos", with no errno:
        # whatever failed while writing where no room is left is taken for what it most likely is
        code = errno.ENOSPC
    if code is None:
        return None
    reason = reason or os.strerror(code)
    return f"cannot write {path}: {reason}; {_WRITE_HINTS.get(code, 'is the disk full or read-only?')}"


def _no_room(path: Path, least: int = 4 * 2**20) -> bool:
    """Whether the file system of ``path`` (or of its nearest existing folder) has under ``least`` bytes free."""
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        stat = os.statvfs(path)
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize < least


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Everything vlmkit writes goes through here: an OS error inside the block becomes one
    ``WriteError`` line naming ``path`` (the file, or the folder being written) and what to do."""
    from vlmkit.core.errors import VlmkitError, WriteError

    try:
        yield
    except VlmkitError:  # already one line (an export's own error, say)
        raise
    except Exception as exc:
        if (problem := write_problem(path, exc)) is None:
            raise
        raise WriteError(problem) from exc


class FileLock:
    """An exclusive ``flock`` on ``path`` (created if missing) from ``acquire`` to ``release``.

    ``blocking``: ``acquire`` waits for another holder; otherwise it returns False at once (any
    ``OSError`` of ``flock`` counts as held). The system releases the lock when the process dies,
    so a killed holder leaves none behind. Where ``fcntl`` is missing (Windows) it does nothing and
    ``acquire`` returns True. ``fd`` is the open file while held, for the holder to write into.
    """

    def __init__(self, path: str | Path, *, blocking: bool = True) -> None:
        self.path = Path(path)
        self.blocking = blocking
        self.fd: int | None = None

    def acquire(self) -> bool:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.blocking else fcntl.LOCK_NB))
        except OSError:
            os.close(fd)
            if self.blocking:
                raise
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def make_dirs(path: str | Path) -> Path:
    """``path`` created with its parents (``mkdir -p``); ``WriteError`` when it cannot be."""
    path = Path(path)
    with writing(path):
        path.mkdir(parents=True, exist_ok=True)
    return path


def check_writable_folder(path: str | Path, flag: str) -> None:
    """Refuse, before any work, an output folder that cannot be written: ``path`` is a file, lies
    below a file, or its nearest existing folder is not writable. ``flag`` names the option."""
    from vlmkit.core.errors import WriteError

    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise WriteError(f"{flag} {path} is a file, not a folder; choose a folder")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise WriteError(f"{flag} {path}: {existing} is a file, not a folder; choose another place")
    if not os.access(existing, os.W_OK | os.X_OK):
        why = "read-only" if _read_only(existing) else "not writable by this user"
        raise WriteError(f"{flag} {path}: {existing} is {why}; choose another place")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def cache_dir(*parts: str) -> Path:
    """``$VLMKIT_HOME`` (default ``~/.cache/vlmkit``) joined with ``parts``; created on demand."""
    root = Path(os.environ.get("VLMKIT_HOME") or Path.home() / ".cache" / "vlmkit").expanduser()
    path = root.joinpath(*parts)
    if root.exists() and not root.is_dir():
        from vlmkit.core.errors import WriteError

        raise WriteError(f"VLMKIT_HOME {root} is a file, not a folder; point VLMKIT_HOME at a folder")
    return make_dirs(path)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)``, flushed to disk, then renamed onto ``path``: a reader (or a run killed
    half-way) sees the old file or the new one, never half of one. ``WriteError`` naming ``path``
    when the system refuses (disk full, read-only)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with writing(path):
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_folder(target: Path, on_exists: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """A temporary folder beside ``target`` to write a folder into, renamed onto ``target`` when
    the block succeeds: a reader sees no folder or a complete one, and a failed or interrupted
    block leaves none. Where ``target`` exists by then, ``on_exists(target)`` decides: True
    replaces it, False keeps it and drops the new one (another process published it first); it
    may raise to refuse. Without ``on_exists`` it is replaced.

    The temporary folder is ``.NAME.PID-XXXXXXXX.partial``: the process id tells the folder of a
    live writer from one left by a killed one (``kill -9``, a power cut), which the next call for
    the same ``target`` removes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(target)
    prefix = f".{target.name}.{os.getpid()}-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".partial", dir=target.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; the folder is an ordinary one
        if not target.exists():
            os.replace(tmp, target)
        elif on_exists is None or on_exists(target):
            old = tmp.with_suffix(".replaced")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_abandoned(target: Path) -> None:
    """The temporary folders ``staged_folder`` made for ``target`` in processes that are gone;
    those of a live process (another export to the same place, still running) stay."""
    name = re.compile(rf"\.{re.escape(target.name)}\.(\d+)-[a-z0-9_]+\.partial")
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*.partial"):
        found = name.fullmatch(stale.name)
        if found and not _alive(int(found.group(1))) and stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # Windows' os.kill(pid, 0) would end the process
        return True
    try:
        os.kill(pid, 0)  # signal 0: only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_json(path: Path, data: Any, indent: int = 2) -> None:
    """``data`` as JSON at ``path``, atomically (``atomic_write``)."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=indent) + "\n"))


def read_manifest(
    folder: str | Path, name: str, *, format: str, version: int, what: str, make: str
) -> dict[str, Any]:
    """The JSON manifest ``name`` of the folder vlmkit wrote (a model, an ONNX export, ...), checked
    to be ``format`` at a ``version`` this vlmkit reads; a one-line ``ArtifactError`` otherwise.
    ``what`` names the folder's kind ("vlmkit model"), ``make`` says how to make one."""
    from vlmkit.core.errors import ArtifactError

    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"{what} folder {folder} does not exist")
    file = folder / name
    if not file.is_file():
        raise ArtifactError(f"{folder} is not a {what} (no {name}); {make}")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{file} is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{file} is not a {what} manifest (a JSON {type(manifest).__name__})")
    if manifest.get("format") != format:
        raise ArtifactError(f"{file} is not a {what} manifest (format is {manifest.get('format')!r})")
    if manifest.get("format_version", 0) > version:
        raise ArtifactError(
            f"{folder} was written by a newer vlmkit (format {manifest['format_version']}); upgrade vlmkit"
        )
    return manifest
