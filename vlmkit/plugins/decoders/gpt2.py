"""GPT-2 decoders (``model_type`` ``gpt2``), e.g. ``openai-community/gpt2``.

A base model: no chat template, so the plain format (image, optional prompt, caption +
``<|endoftext|>``). The tokenizer has no pad token: pad = EOS, which is harmless because labels come
from ``Formatted.target``, never from comparing ids with the pad id. Attention and MLP use
transformers' ``Conv1D`` (weights stored transposed), so LoRA needs ``fan_in_fan_out=True``.
"""

import vlmkit
from vlmkit.sdk.decoders import TransformersDecoderSpec


class GPT2Decoder(TransformersDecoderSpec):
    name = "gpt2"
    description = "OpenAI GPT-2 causal LMs (plain prompts), LoRA on c_attn/c_proj (Conv1D)"
    default_checkpoint = "openai-community/gpt2"
    model_types = ("gpt2",)
    lora_targets = ("c_attn", "c_proj")
    layer_class = "GPT2Block"
    # Conv1D stores its weight as [in, out], the transpose of nn.Linear's
    lora_options = {"fan_in_fan_out": True}


@vlmkit.hookimpl
def register_decoders(register):
    register(GPT2Decoder())
