"""The tiny model the FSDP and DeepSpeed tests shard: every kind of parameter a real run has
(frozen base, LoRA, projection, one unfrozen encoder block)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmkit.testing import tiny_decoder_checkpoint, tiny_encoder_checkpoint


def tiny_sharded_config(root: Path) -> dict[str, Any]:
    """A model config over tiny SigLIP and Llama checkpoints written under ``root``."""
    return {
        "encoder": "siglip",
        "encoder_checkpoint": tiny_encoder_checkpoint("siglip", root / "siglip", image_size=32),
        "decoder": "smollm",
        "decoder_checkpoint": tiny_decoder_checkpoint("llama", root / "llama"),
        "projection": {"type": "mlp", "reduction": "avgpool", "tokens": 4},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "unfreeze_encoder_layers": 1,
        "max_caption_tokens": 8,
    }
