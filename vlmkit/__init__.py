"""vlmkit: turn a pretrained vision encoder and a decoder-only LM into an image captioner.

This namespace is the public API, and all a plugin author imports besides ``vlmkit.testing``:

- the contract: ``hookimpl`` and the hooks (``vlmkit/core/hookspecs.py``), the spec base classes
  ``EncoderSpec``, ``DecoderSpec``, ``DatasetSpec`` and what they deal in (``VisionEncoder``,
  ``Formatted``, ``CaptionExample``, ``CaptionDataset``, ``SPLITS``);
- the toolkit to subclass or call: ``TransformersDecoderSpec`` (decoder families on transformers),
  ``VisionEncoderModule`` and ``encoders`` (encoder backbones; both import torch), the dataset
  helpers (``parse_options``, ``assign_split``, ``check_split``, ``fingerprint``, ``ListDataset``,
  ``SplitFractions``, ``DEFAULT_FRACTIONS``) and ``cache_dir``;
- the errors (``VlmkitError`` and its kinds), ``load`` (a saved model), ``build`` (a fresh one)
  and ``explain(model,
  caption)``: what the LM is fed for one example (ids, pieces, image slots, labels; ``vlmkit inspect``).

Kept light on purpose: importing vlmkit (and ``vlmkit --help``) imports no torch; the toolkit
names load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from vlmkit.core import __version__
from vlmkit.core.contracts import (
    SPLITS,
    CaptionDataset,
    CaptionExample,
    DatasetSpec,
    DecoderSpec,
    EncoderSpec,
    Formatted,
    VisionEncoder,
)
from vlmkit.core.errors import (
    ArtifactError,
    ConfigError,
    DataError,
    ExportError,
    PluginError,
    VlmkitError,
    VlmkitWarning,
)
from vlmkit.core.hookspecs import hookimpl
from vlmkit.core.paths import cache_dir

#: toolkit name -> the module that defines it, imported on first use (some import torch)
_LAZY = {
    "TransformersDecoderSpec": "vlmkit.sdk.decoders",
    "convert_gguf_checkpoint": "vlmkit.sdk.checkpoints",
    "VisionEncoderModule": "vlmkit.sdk.encoders",
    "encoders": "vlmkit.sdk.encoders",
    "DEFAULT_FRACTIONS": "vlmkit.sdk.datasets",
    "DataWarning": "vlmkit.sdk.datasets",
    "ListDataset": "vlmkit.sdk.datasets",
    "SplitFractions": "vlmkit.sdk.datasets",
    "assign_split": "vlmkit.sdk.datasets",
    "check_split": "vlmkit.sdk.datasets",
    "fingerprint": "vlmkit.sdk.datasets",
    "captions_of": "vlmkit.sdk.datasets",
    "parse_options": "vlmkit.sdk.datasets",
    "stratified_splits": "vlmkit.sdk.datasets",
    "explain": "vlmkit.core.explain",
}

__all__ = [
    "SPLITS",
    "ArtifactError",
    "CaptionDataset",
    "CaptionExample",
    "ConfigError",
    "DataError",
    "DatasetSpec",
    "DecoderSpec",
    "EncoderSpec",
    "ExportError",
    "Formatted",
    "PluginError",
    "VisionEncoder",
    "VlmkitError",
    "VlmkitWarning",
    "__version__",
    "cache_dir",
    "build",
    "hookimpl",
    "load",
    *_LAZY,
]


def load(path, **kwargs):
    """Rebuild a saved model (``PrefixConditioningVLM``) or a merged export from its folder.

    ``kwargs``: ``registry`` (default: the installed plugins), ``trainable`` (keep LoRA trainable),
    ``device`` (``cpu`` by default, ``cuda``, ``cuda:N``, ``mps``, ``auto``) and ``dtype``
    (``float32`` by default, ``bfloat16``, ``float16``).
    """
    from vlmkit.core.model import PrefixConditioningVLM
    from vlmkit.core.placement import place

    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    return place(PrefixConditioningVLM.load, path, device=device, dtype=dtype, **kwargs)


def build(config=None, **kwargs):
    """A fresh model (``PrefixConditioningVLM``): the encoder and decoder through their plugins,
    new LoRA and projection. ``config`` is a model config as a dict (``encoder``, ``decoder``, their
    ``*_checkpoint``, ``projection``, ``lora``, ``prompt``, ``format``, ...; ``vlmkit.core.config``).

    ``kwargs``: ``registry`` (default: the installed plugins; ``vlmkit.testing.make_registry(...)``
    for specs that are not installed), ``seed`` (LoRA and projection init, 0) and ``dtype``.
    """
    from vlmkit.core.model import PrefixConditioningVLM

    return PrefixConditioningVLM.build(config, **kwargs)


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'vlmkit' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = module if name == "encoders" else getattr(module, name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
