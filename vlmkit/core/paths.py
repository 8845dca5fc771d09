"""Where vlmkit keeps derived files (converted checkpoints, feature caches), and reading the JSON
manifests of the folders it writes (models, exports)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def cache_dir(*parts: str) -> Path:
    """``$VLMKIT_HOME`` (default ``~/.cache/vlmkit``) joined with ``parts``; created on demand."""
    root = Path(os.environ.get("VLMKIT_HOME") or Path.home() / ".cache" / "vlmkit").expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


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
