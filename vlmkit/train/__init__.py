"""``vlmkit train``: the job (``vlmkit.train.job``), its configuration (``vlmkit.train.config``,
torch-free), the Trainer subclass, the data it is fed and the feature cache.

``vlmkit.train.run(config)`` is the command (``train(config, resume=, overwrite=)`` the same job
with its run actions as arguments). ``from vlmkit.train import run`` imports the job (and torch) on first use, so that importing the
configuration alone stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_JOB = ("RUN_FILE", "TrainResult", "last_checkpoint", "prepare_output_dir", "run", "steps_per_epoch", "train")

__all__ = list(_JOB)


def __getattr__(name: str) -> Any:
    if name not in _JOB:
        raise AttributeError(f"module 'vlmkit.train' has no attribute {name!r}")
    return getattr(importlib.import_module("vlmkit.train.job"), name)
