"""SigLIP and SigLIP2 vision encoders (Hugging Face transformers).

Features are the patch tokens of the vision tower's ``last_hidden_state`` (after its final
LayerNorm): 14x14 = 196 tokens of 768 for ``google/siglip-base-patch16-224``. SigLIP has no CLS
token, so every token is a grid cell. Full SigLIP checkpoints (vision + text) are accepted; only
the vision tower is loaded.

SigLIP2 comes in two kinds. Fixed-resolution checkpoints (``google/siglip2-base-patch16-224``)
have ``model_type`` ``siglip`` and load exactly like SigLIP. NaFlex checkpoints
(``model_type`` ``siglip2``) take a variable number of patches per image; vlmkit needs a fixed
token grid, so it resizes every image to the largest square the processor's ``max_num_patches``
allows (16x16 patches = 256 px for the default 256). For square images that is exactly what the
checkpoint's own processor does; other aspect ratios are stretched instead of kept.

No torch import at module level: ``vlmkit plugins list`` imports this file.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import vlmkit

SIGLIP_TYPES = ("siglip_vision_model", "siglip")
NAFLEX_TYPES = ("siglip2_vision_model", "siglip2")


class SiglipEncoder(vlmkit.EncoderSpec):
    name = "siglip"
    description = "SigLIP / SigLIP2 vision tower (transformers): last-layer patch tokens"
    default_checkpoint = "google/siglip-base-patch16-224"
    checkpoints = {}
    #: ``config.model_type`` values accepted (full checkpoints give up their vision tower)
    model_types = SIGLIP_TYPES + NAFLEX_TYPES

    def load(self, checkpoint: str | None = None, *, revision: str | None = None):
        from vlmkit.sdk import encoders

        checkpoint = checkpoint or self.default_checkpoint
        local = encoders.local_checkpoint(checkpoint)
        source = str(local) if local is not None else checkpoint
        config = encoders.hf_config(source, revision, accepted=self.model_types, family="siglip")
        vision_config = getattr(config, "vision_config", config)  # full checkpoint: take the vision tower
        if config.model_type in NAFLEX_TYPES:
            return _load_naflex(source, revision, vision_config)
        return _load_fixed(source, revision, vision_config)


def _load_fixed(checkpoint: str, revision: str | None, config: Any):
    from transformers import SiglipImageProcessor, SiglipVisionModel

    from vlmkit.sdk import encoders

    model = encoders.load_hf_model(
        SiglipVisionModel, checkpoint, revision=revision, config=config, family="siglip"
    )
    size = config.image_size
    processor = encoders.hf_image_processor(
        checkpoint,
        revision,
        family="siglip",
        default=lambda: SiglipImageProcessor(size={"height": size, "width": size}),
    )
    preprocess = encoders.hf_fixed_size_preprocess(processor, checkpoint, size)
    patch = config.patch_size
    return encoders.VisionEncoderModule(
        model,
        tokens=_last_hidden_state,
        preprocess=preprocess,
        blocks=encoders.transformer_blocks(model),
        grid=(size // patch, size // patch),
        feature_dim=config.hidden_size,
        input_size=(size, size),
        checkpoint=checkpoint,
        revision=revision,
        image_processing=encoders.hf_image_processing(processor),
        identity={
            "features": "siglip last_hidden_state",
            "architecture": encoders.hf_config_identity(config),
            "preprocessing": encoders.hf_processor_identity(processor),
        },
    )


def _load_naflex(checkpoint: str, revision: str | None, config: Any):
    from transformers import Siglip2ImageProcessor, Siglip2VisionModel

    from vlmkit.sdk import encoders

    model = encoders.load_hf_model(
        Siglip2VisionModel, checkpoint, revision=revision, config=config, family="siglip"
    )
    patch = config.patch_size
    processor = encoders.hf_image_processor(
        checkpoint,
        revision,
        family="siglip",
        default=lambda: Siglip2ImageProcessor(patch_size=patch, max_num_patches=config.num_patches),
    )
    side = math.isqrt(processor.max_num_patches)
    # The processor's own steps (resample, rescale, normalise) with a fixed square target size.
    steps = {
        "size": (side * patch, side * patch),
        "resample": int(processor.resample),
        "rescale_factor": processor.rescale_factor if processor.do_rescale else 1.0,
        "mean": tuple(processor.image_mean) if processor.do_normalize else (0.0, 0.0, 0.0),
        "std": tuple(processor.image_std) if processor.do_normalize else (1.0, 1.0, 1.0),
    }
    return encoders.VisionEncoderModule(
        model,
        tokens=partial(_naflex_tokens, patch_size=patch),
        preprocess=partial(encoders.resize_normalize, **steps),
        blocks=encoders.transformer_blocks(model),
        grid=(side, side),
        feature_dim=config.hidden_size,
        input_size=steps["size"],
        checkpoint=checkpoint,
        revision=revision,
        image_processing=encoders.resize_normalize_processing(**steps),
        identity={
            "features": "siglip2 naflex last_hidden_state, square grid",
            "architecture": encoders.hf_config_identity(config),
            "preprocessing": {"class": "square resize_normalize", **steps},
        },
    )


def _last_hidden_state(model, pixel_values):
    return model(pixel_values=pixel_values).last_hidden_state


def _naflex_tokens(model, pixel_values, *, patch_size: int):
    """Cut ``[B, 3, H, W]`` into the patch sequence NaFlex models take (the processor's layout:
    patches row-major, each flattened as (row, col, channel)), all patches valid."""
    import torch

    b, c, h, w = pixel_values.shape
    rows, cols = h // patch_size, w // patch_size
    patches = (
        pixel_values.reshape(b, c, rows, patch_size, cols, patch_size)
        .permute(0, 2, 4, 3, 5, 1)
        .reshape(b, rows * cols, patch_size * patch_size * c)
    )
    mask = torch.ones(b, rows * cols, dtype=torch.int32, device=pixel_values.device)
    # expanded from the batch size, not built for it: an ONNX trace would fix the batch otherwise
    shapes = torch.tensor([[rows, cols]], dtype=torch.long, device=pixel_values.device).expand(b, 2)
    return model(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes).last_hidden_state


@vlmkit.hookimpl
def register_encoders(register):
    register(SiglipEncoder())
