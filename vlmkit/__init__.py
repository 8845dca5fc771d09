"""vlmkit: turn a pretrained vision encoder and a decoder-only LM into an image captioner.

Kept light on purpose: importing vlmkit (and ``vlmkit --help``) does not import torch.
"""

from vlmkit.core.contracts import (
    CaptionDataset,
    CaptionExample,
    DatasetSpec,
    DecoderSpec,
    EncoderSpec,
    Formatted,
    VisionEncoder,
)
from vlmkit.core.errors import VlmkitError
from vlmkit.core.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = [
    "CaptionDataset",
    "CaptionExample",
    "DatasetSpec",
    "DecoderSpec",
    "EncoderSpec",
    "Formatted",
    "VisionEncoder",
    "VlmkitError",
    "__version__",
    "hookimpl",
    "load",
]


def load(path, **kwargs):
    """Rebuild a saved model (``PrefixConditioningVLM``) from its folder. See ``vlmkit.core.model``."""
    from vlmkit.core.model import PrefixConditioningVLM

    return PrefixConditioningVLM.load(path, **kwargs)
