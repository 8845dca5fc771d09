"""The contract suite catches what decoder families really do, and vlmkit handles it by mechanism.

Two families with quirks, declared here as a third-party author would (data only, on
``TransformersDecoderSpec``), on tiny random checkpoints of their real transformers classes:

- Gemma-2: embeddings scaled by sqrt(hidden) inside its embedding module, final-logit
  softcapping, attention-logit softcapping, and sliding-window attention on every other layer
  (a window shorter than the prompt here, so that it matters);
- Mistral with a short ``sliding_window`` on every layer (no hybrid cache): coverage, it passed before;
- Granite: an embedding multiplier applied to ``inputs_embeds`` inside the model, and logits
  divided by ``logits_scaling``.

``check_decoder`` exports them to ONNX and compares the torch-free runtime with PyTorch on a
model whose LoRA and projection are random, and compares the training loss with the model's own
logits at realistic magnitudes. Each quirk, taken alone, broke one of those checks before vlmkit
ran embeddings and logits through the model's own modules.
"""

from __future__ import annotations

import pytest

from vlmkit.sdk.decoders import TransformersDecoderSpec
from vlmkit.testing import check_decoder, tiny_decoder_checkpoint_from_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Gemma2Decoder(TransformersDecoderSpec):
    name = "gemma2"
    description = "Gemma-2 (test-only)"
    model_types = ("gemma2",)
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    layer_class = "Gemma2DecoderLayer"


class GraniteDecoder(TransformersDecoderSpec):
    name = "granite"
    description = "Granite (test-only)"
    model_types = ("granite",)
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    layer_class = "GraniteDecoderLayer"


class MistralDecoder(TransformersDecoderSpec):
    name = "mistral"
    description = "Mistral (test-only): sliding-window attention on every layer"
    model_types = ("mistral",)
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    layer_class = "MistralDecoderLayer"


SMALL = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256,
)  # fmt: skip


def gemma2_config(**quirks):
    from transformers import Gemma2Config

    # head_dim 16 = 64 / 4; query_pre_attn_scalar = head_dim as in the released models
    settings = dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8, final_logit_softcapping=30.0)
    return Gemma2Config(**SMALL, **{**settings, **quirks})


def granite_config(**quirks):
    from transformers import GraniteConfig

    # the multipliers of granite-3.0-2b-instruct
    settings = dict(embedding_multiplier=12.0, logits_scaling=8.0, residual_multiplier=0.22)
    return GraniteConfig(**SMALL, attention_multiplier=1 / 16, **{**settings, **quirks})


def mistral_config():
    from transformers import MistralConfig

    # 2 layers of window 16 see 30 tokens back: the image (16 tokens before a 12-token prompt)
    # partly, the start of the conversation not at all
    return MistralConfig(**SMALL, head_dim=16, sliding_window=16)


#: case -> (spec, config, tokenizer style); each "only" case has one quirk, the others switched off
CASES = {
    "gemma2": (Gemma2Decoder, lambda: gemma2_config(), "gemma"),
    "gemma2-only-embedding-scale": (
        Gemma2Decoder,
        lambda: gemma2_config(sliding_window=256, final_logit_softcapping=None),
        "gemma",
    ),
    "gemma2-only-logit-softcap": (Gemma2Decoder, lambda: gemma2_config(sliding_window=256), "gemma"),
    "gemma2-only-sliding-window": (
        Gemma2Decoder,
        lambda: gemma2_config(final_logit_softcapping=None),
        "gemma",
    ),
    "granite": (GraniteDecoder, lambda: granite_config(), "chatml"),
    "mistral-sliding-window": (MistralDecoder, lambda: mistral_config(), "smollm"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_family_with_quirks_keeps_the_contract(case, tmp_path):
    spec, config, style = CASES[case]
    checkpoint = tiny_decoder_checkpoint_from_config(config(), style, tmp_path / "lm")
    report = check_decoder(spec(), checkpoint, tmp_path)
    assert report["loss_paths"]["largest_logit"] > 5  # the check ran at a realistic magnitude
    # the export's own self-check fed real caption ids through embed_tokens.npy and the runtime
    assert report["onnx"]["checks"]["teacher_forced_max_rel_diff"] <= 1e-4
    if not case.startswith("granite"):  # a random tiny Granite's last position barely sees the image
        assert report["onnx"]["image_dependent"]  # so ONNX and PyTorch agreed on image-dependent captions
