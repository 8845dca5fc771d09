"""Microsoft Phi decoders: Phi-2 (``model_type`` ``phi``) and Phi-3/3.5 (``phi3``).

The two differ in what LoRA adapts and in the prompt:

- Phi-2 (``microsoft/phi-2``, the default) is a base model: separate ``q_proj``/``k_proj``/
  ``v_proj`` and an output projection named ``dense``; its tokenizer has no chat template and no
  pad token, so the plain format is used (caption + ``<|endoftext|>``) and pad = EOS.
- Phi-3 (``microsoft/Phi-3-mini-4k-instruct``) fuses attention into ``qkv_proj`` + ``o_proj``; its
  chat template (``<|user|>``/``<|assistant|>``/``<|end|>``) is used, captions end with ``<|end|>``
  and generation also stops at ``<|endoftext|>``.

``lora_targets`` therefore names them per ``model_type``.
"""

import vlmkit
from vlmkit.sdk.decoders import TransformersDecoderSpec


class PhiDecoder(TransformersDecoderSpec):
    name = "phi"
    description = "Microsoft Phi-2 (plain prompts) and Phi-3/3.5 (chat) causal LMs"
    default_checkpoint = "microsoft/phi-2"
    model_types = ("phi", "phi3")
    lora_targets = {"phi": ("q_proj", "k_proj", "v_proj", "dense"), "phi3": ("qkv_proj", "o_proj")}
    layer_class = "PhiDecoderLayer"
    layer_classes = ("Phi3DecoderLayer",)


@vlmkit.hookimpl
def register_decoders(register):
    register(PhiDecoder())
