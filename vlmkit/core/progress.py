"""The one progress bar of vlmkit: rich, on stderr, for every long step (reading shards, downloading
images, caching features, captioning, training), so they all look alike and none mixes with
stdout (which holds a command's results: captions, JSON).

``progress_bar(label, total)`` yields ``advance(n, total=None, **fields)``: ``total`` may arrive
with the first advance (a job knows its size only once it has loaded its data), and ``fields``
set the text of the bar's extra columns (``columns=("loss",)``, ``advance(1, loss="loss 2.314")``).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

Advance = Callable[..., None]


@contextlib.contextmanager
def progress_bar(
    label: str,
    total: int | None = None,
    enabled: bool | None = None,
    *,
    start: int = 0,
    columns: tuple[str, ...] = (),
    transient: bool = True,
) -> Iterator[Advance]:
    """A bar labelled ``label`` (``enabled=None``: when stderr is a terminal); see the module."""
    if enabled is None:
        enabled = sys.stderr.isatty() and (total is None or total > 1)
    if not enabled:
        yield lambda n=0, total=None, **fields: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    extra = [TextColumn(f"{{task.fields[{name}]}}") for name in columns]
    shown = (TextColumn(label), BarColumn(), MofNCompleteColumn(), *extra, TimeRemainingColumn())
    with Progress(*shown, console=Console(stderr=True), transient=transient) as bar:
        task = bar.add_task(label, total=total, completed=start, **dict.fromkeys(columns, ""))

        def advance(n: int = 0, total: int | None = None, **fields: Any) -> None:
            bar.update(task, advance=n, **({"total": total} if total is not None else {}), **fields)

        yield advance
