"""What an export is doing now: logged, and told to the caller's ``on_step`` (the CLI's spinner)."""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger("vlmkit.export")


def step(on_step: Callable[[str], None] | None, message: str) -> None:
    log.info("%s", message)
    if on_step is not None:
        on_step(message)
