"""Where vlmkit keeps derived files (converted checkpoints, feature caches), writing files so that
a reader never sees half of one, and reading the JSON manifests of the folders it writes."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
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


def write_json(path: Path, data: Any, indent: int = 2) -> None:
    """``data`` as JSON at ``path``, atomically (``atomic_write``)."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=indent) + "\n"))


def read_json_manifest(file: Path, what: str) -> dict[str, Any]:
    """The JSON object in ``file``; ``ArtifactError`` when it is not valid JSON or not an object
    (``what`` names it: "vlmkit model manifest"). Callers check existence and format fields."""
    from vlmkit.core.errors import ArtifactError

    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{file} is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{file} is not a {what} (a JSON {type(manifest).__name__})")
    return manifest
