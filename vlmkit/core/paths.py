"""Where vlmkit keeps derived files (converted checkpoints, feature caches)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """``$VLMKIT_HOME`` (default ``~/.cache/vlmkit``) joined with ``parts``; created on demand."""
    root = Path(os.environ.get("VLMKIT_HOME") or Path.home() / ".cache" / "vlmkit").expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
