"""A tiny random Mistral checkpoint for tests: this package's, and anyone's who uses ``mistral``.

It is built offline, in about a second, from vlmkit's tiny tokenizer (``vlmkit.testing``)::

    from vlmkit.testing import check_decoder
    from vlmkit_plugin_example.mistral import MistralDecoder
    from vlmkit_plugin_example.testing import tiny_mistral_checkpoint

    check_decoder(MistralDecoder(), tiny_mistral_checkpoint(tmp_path / "mistral"), tmp_path)

Only the architecture and the tokenizer's conventions are real; the weights are random.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

#: Mistral-7B-Instruct's ``[INST]`` chat template (v0.1 style): no system role, BOS written by the
#: template, the answer follows ``[/INST]`` and ends with EOS
MISTRAL_INSTRUCT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    "{% endfor %}"
)

#: small enough to build, load and train a step in well under a second
TINY_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "sliding_window": None,
}


def tiny_mistral_tokenizer(*, chat: bool = True):
    """A ~640-token tokenizer with Mistral's conventions: SentencePiece-style BPE (``▁``, byte
    fallback), ``<unk>`` ``<s>`` ``</s>`` as ids 0-2, adds ``<s>``, EOS ``</s>``, no pad token, and
    the ``[INST]`` template (none with ``chat=False``, like the base model)."""
    from vlmkit.testing import tiny_tokenizer

    # vlmkit's "phi3" style has Mistral's vocabulary layout; only the roles and template differ
    # (its unused <|user|>-style control tokens stay in the vocabulary, harmlessly)
    tokenizer = tiny_tokenizer("phi3")
    tokenizer.eos_token = "</s>"
    tokenizer.pad_token = None
    tokenizer.chat_template = MISTRAL_INSTRUCT_TEMPLATE if chat else None
    return tokenizer


def tiny_mistral_checkpoint(path: str | Path | None = None, *, chat: bool = True) -> str:
    """Save a tiny random ``MistralForCausalLM`` (2 layers, width 64) with ``tiny_mistral_tokenizer``
    to ``path`` (default: a new temporary folder) and return the folder, ready for
    ``MistralDecoder().load(folder)``.

    ``vlmkit.testing.tiny_decoder_checkpoint_from_config`` takes a style name or, as here, a
    tokenizer you built: it sizes the model's vocabulary and special ids to it and seeds the
    weights without touching torch's global generator. The pad id stays unset, as in the real
    checkpoints (vlmkit's loader sets pad = EOS).
    """
    from transformers import MistralConfig
    from vlmkit.testing import tiny_decoder_checkpoint_from_config

    path = Path(path) if path is not None else Path(tempfile.mkdtemp(prefix="tiny-mistral-"))
    tokenizer = tiny_mistral_tokenizer(chat=chat)
    return tiny_decoder_checkpoint_from_config(MistralConfig(**TINY_CONFIG), tokenizer, path)
