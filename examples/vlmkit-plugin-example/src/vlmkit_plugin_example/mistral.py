"""Mistral decoders (``model_type`` ``mistral``): Mistral-7B and its Instruct versions.

The short path for a decoder family that loads with ``AutoModelForCausalLM``: subclass
``TransformersDecoderSpec`` and declare what makes the family different. The base class does the
rest from what the checkpoint says about itself:

- loading: reads the config first and refuses a checkpoint whose ``model_type`` is not in
  ``model_types`` (a Llama checkpoint handed to ``--decoder mistral`` fails before any weight is
  read); Mistral's tokenizer has no pad token, so pad = EOS (``</s>``), which is safe because
  vlmkit never finds padding or labels by comparing ids with the pad id;
- formatting: the Instruct checkpoints' ``[INST] ... [/INST]`` chat template is rendered with the
  image in the user turn and cut there, so ``before`` is ``<s>[INST]``, ``after`` is
  ``prompt [/INST]``, and ``target`` is the caption + ``</s>``. The template rejects a ``system``
  role; the base class notices and renders without one. Base checkpoints (no template) get the
  plain format: ``<s>``, image, prompt, caption + ``</s>``;
- LoRA: ``resolve_lora_targets`` keeps the names of ``lora_targets`` that are linear modules of
  the loaded model, and fails naming the model's modules when none is.

Override a method only for a real family quirk (``resolve_checkpoint`` for named local
checkpoints, ``prepare`` for tokenizer fix-ups, ``format`` for a prompt layout no template gives).
"""

import vlmkit


class MistralDecoder(vlmkit.TransformersDecoderSpec):
    name = "mistral"
    description = "Mistral-7B and Mistral-7B-Instruct ([INST] chat template); example third-party plugin"
    default_checkpoint = "mistralai/Mistral-7B-Instruct-v0.2"
    model_types = ("mistral",)
    # attention projections only: r=16 on q/k/v/o adapts ~0.2% of a 7B model, enough for captions
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    layer_class = "MistralDecoderLayer"
