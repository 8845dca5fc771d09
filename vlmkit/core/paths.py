"""Where vlmkit keeps derived files (converted checkpoints, feature caches), writing files so that
a reader never sees half of one, and reading the JSON manifests of the folders it writes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def cache_dir(*parts: str) -> Path:
    """``$VLMKIT_HOME`` (default ``~/.cache/vlmkit``) joined with ``parts``; created on demand."""
    root = Path(os.environ.get("VLMKIT_HOME") or Path.home() / ".cache" / "vlmkit").expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)``, flushed to disk, then renamed onto ``path``: a reader (or a run killed
    half-way) sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_folder(target: Path, on_exists: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """A temporary folder beside ``target`` to write a folder into, renamed onto ``target`` when
    the block succeeds: a reader sees no folder or a complete one, and a failed or interrupted
    block leaves none. Where ``target`` exists by then, ``on_exists(target)`` decides: True
    replaces it, False keeps it and drops the new one (another process published it first); it
    may raise to refuse. Without ``on_exists`` it is replaced."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
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
