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


def assert_artifact_matches(path, reference, want: dict, pixels, captions: list[str]) -> list:
    """The artifact at ``path`` loads in one process with the trained tensors ``want`` (by name),
    and the logits and generated ids of ``reference``, the same training without sharding.
    Returns those ids."""
    import torch

    import vlmkit

    loaded = vlmkit.load(path)
    state = loaded.state_dict()  # a loaded model is frozen: what was trained, by name
    for name, value in want.items():
        assert torch.allclose(state[name], value, atol=1e-5), name
    batch = reference.tokenize(captions).to_dict()
    with torch.no_grad():
        logits = reference(**batch, pixel_values=pixels, return_logits=True)["logits"]
        assert torch.allclose(
            loaded(**batch, pixel_values=pixels, return_logits=True)["logits"], logits, atol=1e-4
        )
    ids = reference.generate(pixel_values=pixels, return_ids=True, max_new_tokens=8)
    assert loaded.generate(pixel_values=pixels, return_ids=True, max_new_tokens=8) == ids
    return ids
