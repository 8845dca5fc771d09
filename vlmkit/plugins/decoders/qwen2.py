"""Qwen2 / Qwen2.5 decoders (``model_type`` ``qwen2``), e.g. ``Qwen/Qwen2.5-0.5B-Instruct``.

ChatML template (``<|im_start|>role ... <|im_end|>``); captions end with ``<|im_end|>``, Qwen2.5's
EOS for the instruct models. The template injects "You are Qwen, created by Alibaba Cloud..." when
no system message is given: vlmkit uses an empty system turn instead (see
``TransformersDecoderSpec.format``).
"""

import vlmkit
from vlmkit.sdk.decoders import TransformersDecoderSpec


class Qwen2Decoder(TransformersDecoderSpec):
    name = "qwen2"
    description = "Qwen2/Qwen2.5 causal LMs (ChatML), LoRA on the attention projections"
    default_checkpoint = "Qwen/Qwen2.5-0.5B-Instruct"
    model_types = ("qwen2",)
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    layer_class = "Qwen2DecoderLayer"
    # Qwen2/2.5 activations exceed fp16's range (65,504): NaN losses and empty captions on
    # pre-Ampere cards (T4, V100) under fp16, reported by QwenLM; bf16 or fp32 only
    fp16_safe = False


@vlmkit.hookimpl
def register_decoders(register):
    register(Qwen2Decoder())
