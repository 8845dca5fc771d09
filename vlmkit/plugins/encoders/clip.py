"""CLIP vision encoders (Hugging Face transformers ``CLIPVisionModel``).

Features are the last layer's patch tokens: 7x7 = 49 tokens of 768 for
``openai/clip-vit-base-patch32``. Full CLIP checkpoints (vision + text) are accepted; only the
vision tower is loaded.

No torch import at module level: ``vlmkit plugins list`` imports this file.
"""

from __future__ import annotations

import vlmkit

CLIP_TYPES = ("clip_vision_model", "clip")


class ClipEncoder(vlmkit.EncoderSpec):
    name = "clip"
    description = "CLIP vision tower (transformers): last-layer patch tokens, CLS dropped"
    default_checkpoint = "openai/clip-vit-base-patch32"
    checkpoints = {}
    #: ``config.model_type`` values accepted (full checkpoints give up their vision tower)
    model_types = CLIP_TYPES

    def load(self, checkpoint: str | None = None, *, revision: str | None = None):
        from transformers import CLIPImageProcessor, CLIPVisionModel

        from vlmkit.sdk import encoders

        checkpoint = checkpoint or self.default_checkpoint
        local = encoders.local_checkpoint(checkpoint)
        source = str(local) if local is not None else checkpoint
        config = encoders.hf_config(source, revision, accepted=self.model_types, family="clip")
        config = getattr(config, "vision_config", config)  # full checkpoint: take the vision tower
        model = encoders.load_hf_model(
            CLIPVisionModel, source, revision=revision, config=config, family="clip"
        )
        size = config.image_size
        processor = encoders.hf_image_processor(
            source,
            revision,
            family="clip",
            default=lambda: CLIPImageProcessor(
                size={"shortest_edge": size}, crop_size={"height": size, "width": size}
            ),
        )
        preprocess = encoders.hf_fixed_size_preprocess(processor, source, size)
        patch = config.patch_size
        return encoders.VisionEncoderModule(
            model,
            tokens=_patch_tokens,
            preprocess=preprocess,
            blocks=encoders.transformer_blocks(model),
            grid=(size // patch, size // patch),
            feature_dim=config.hidden_size,
            input_size=(size, size),
            checkpoint=source,
            revision=revision,
            image_processing=encoders.hf_image_processing(processor),
            identity={
                "features": "clip last_hidden_state without CLS",
                "architecture": encoders.hf_config_identity(config),
                "preprocessing": encoders.hf_processor_identity(processor),
            },
        )


def _patch_tokens(model, pixel_values):
    # Token 0 is CLS. Dropping it leaves exactly the patch grid, which pooling and pixel-shuffle
    # need; LLaVA likewise feeds only patch tokens to its LM. last_hidden_state is the last
    # block's output, before post_layernorm (CLIP applies that to the pooled CLS only).
    return model(pixel_values=pixel_values).last_hidden_state[:, 1:]


@vlmkit.hookimpl
def register_encoders(register):
    register(ClipEncoder())
