"""Which process this is under ``torchrun``/``accelerate launch``, and the few collectives vlmkit's
jobs share: a barrier, rank 0's value on every rank, rank 0's one-off work shared with the others.

Outside a process group every helper is the single-process answer (rank 0 of 1, no waiting).
Importing this module never imports torch: a process group exists only where a job has set one
up, and then ``torch.distributed`` is already imported.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from vlmkit.core.errors import VlmkitError


def process_group():
    """``torch.distributed`` when a process group is set up, else ``None``."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    dist = process_group()
    return dist.get_rank() if dist else 0


def world_size() -> int:
    dist = process_group()
    return dist.get_world_size() if dist else 1


def barrier() -> None:
    """Wait for every rank (nothing to wait for outside a process group)."""
    if dist := process_group():
        dist.barrier()


def broadcast(value: Any) -> Any:
    """``value`` as rank 0 has it, on every rank (``value`` itself outside a process group)."""
    dist = process_group()
    if dist is None or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


#: minutes ranks wait for one rank's one-off preparation (default 360)
PREPARE_TIMEOUT_ENV = "VLMKIT_PREPARE_TIMEOUT_MIN"
_preparation: tuple[Any, Any] | None = None  # (the default group it was made for, the group)


def preparation_group():
    """A gloo process group over all ranks whose collectives wait ``VLMKIT_PREPARE_TIMEOUT_MIN``
    minutes (6 hours by default), not the default group's 30 (10 under NCCL): ranks wait in it
    while rank 0 alone checks or downloads a dataset, or while the slowest rank finishes its share
    of a feature cache, which on a first COCO run takes longer. Made once per process group
    (a collective: every rank calls it at the same point)."""
    global _preparation
    from datetime import timedelta

    dist = process_group()
    world = dist.group.WORLD
    if _preparation is None or _preparation[0] is not world:
        minutes = float(os.environ.get(PREPARE_TIMEOUT_ENV, "") or 360)
        _preparation = (world, dist.new_group(backend="gloo", timeout=timedelta(minutes=minutes)))
    return _preparation[1]


def from_rank_zero(compute: Callable[[], Any], what: str, error: type[Exception] = VlmkitError) -> Any:
    """``compute()`` on rank 0, its result on every rank (``compute()`` outside a process group):
    one-off work (checking or downloading images, scoring captions) is done once and every rank
    gets the same answer. A failure on rank 0 is raised there as it is and on the other ranks as
    ``error("<what> on rank 0 failed: ...")``: a rank left waiting for the value would hang. The
    others wait in ``preparation_group``, past the default collective timeout."""
    dist = process_group()
    if dist is None or dist.get_world_size() == 1:
        return compute()
    group = preparation_group()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box = [("ok", compute())]
        except Exception as exc:
            dist.broadcast_object_list([("error", f"{what} on rank 0 failed: {exc}")], src=0, group=group)
            raise
    dist.broadcast_object_list(box, src=0, group=group)
    status, value = box[0]
    if status == "error":
        raise error(value)
    return value
