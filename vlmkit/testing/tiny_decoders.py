"""Tiny, random decoder checkpoints of real architectures, built fully offline.

For tests (ours and plugin authors'): they load through the very same ``from_pretrained`` path as
a hub checkpoint, in well under a second, with no network. The weights are random (seeded), so the
text they generate is noise; what they exercise is the plumbing: config classes, module names,
tokenizers with real chat templates and special-token conventions.

    from vlmkit.testing.tiny_decoders import tiny_decoder_checkpoint, tiny_tokenizer

    path = tiny_decoder_checkpoint("qwen2", tmp_path / "qwen2")   # a folder, like a hub snapshot
    model, tokenizer = get_registry().decoder("qwen2").load(path)

    tok = tiny_tokenizer("phi3")                                   # just a tokenizer

    # your own architecture: any transformers config, plus one of the tokenizer styles
    path = tiny_decoder_checkpoint_from_config(MyConfig(hidden_size=32, ...), "chatml", tmp_path / "m")

Tokenizer styles copy the conventions of a real family (special tokens, BOS/EOS/pad, whether the
tokenizer adds BOS, and the family's own chat template, verbatim):

=========  ============================================================  ==========================
style      like                                                          model
=========  ============================================================  ==========================
smollm     SmolLM2-Instruct: byte-level BPE, BOS ``<|im_start|>``,       ``llama``
           EOS = pad = ``<|im_end|>``, ChatML, template injects a
           default system prompt
chatml     Qwen2.5-Instruct: byte-level BPE, no BOS, EOS ``<|im_end|>``,  ``qwen2``
           pad ``<|endoftext|>``, ChatML, template injects a default
           system prompt
phi3       Phi-3-mini-instruct: SentencePiece-style BPE (``▁``, byte     ``phi3``
           fallback, adds ``<s>``), EOS = pad = ``<|endoftext|>``,
           ``<|user|>``/``<|assistant|>``/``<|end|>`` that swallow the
           newline after them (``rstrip``)
gemma      Gemma-2-it: SentencePiece-style BPE (adds ``<bos>``), pad 0,  (test-only ``gemma2``)
           EOS 1, BOS 2, unk 3 under their own names, turns
           ``<start_of_turn>``/``<end_of_turn>``, a template that
           writes the BOS itself and rejects a system role
plain      GPT-2 / Phi-2: byte-level BPE, ``<|endoftext|>`` is BOS, EOS   ``gpt2``, ``phi``
           and unk, no pad token, no chat template
=========  ============================================================  ==========================
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ARCHITECTURES",
    "TOKENIZER_STYLES",
    "caption_corpus",
    "tiny_decoder_checkpoint",
    "tiny_decoder_checkpoint_from_config",
    "tiny_tokenizer",
]

SEED = 0
VOCAB_SIZE = 640

# ------------------------------------------------------------------------- chat templates (verbatim)

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)


@dataclass(frozen=True)
class _Style:
    kind: str  # "byte" (GPT-2 byte-level BPE) or "sentencepiece" (Metaspace BPE + byte fallback)
    bos: str | None
    eos: str
    unk: str | None
    pad: str | None
    add_bos: bool
    chat_template: str | None
    #: special tokens in id order (first ids of the vocabulary)
    specials: tuple[str, ...]
    #: chat control tokens added after the vocabulary: content -> strip the whitespace after it
    controls: dict[str, bool] = field(default_factory=dict)


_STYLES: dict[str, _Style] = {
    "smollm": _Style(
        kind="byte",
        bos="<|im_start|>",
        eos="<|im_end|>",
        unk="<|endoftext|>",
        pad="<|im_end|>",
        add_bos=False,
        chat_template=SMOLLM2_TEMPLATE,
        specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    ),
    "chatml": _Style(
        kind="byte",
        bos=None,
        eos="<|im_end|>",
        unk=None,
        pad="<|endoftext|>",
        add_bos=False,
        chat_template=QWEN25_TEMPLATE,
        specials=(),
        controls={"<|endoftext|>": False, "<|im_start|>": False, "<|im_end|>": False},
    ),
    "phi3": _Style(
        kind="sentencepiece",
        bos="<s>",
        eos="<|endoftext|>",
        unk="<unk>",
        pad="<|endoftext|>",
        add_bos=True,
        chat_template=PHI3_TEMPLATE,
        specials=("<unk>", "<s>", "</s>"),
        controls={
            "<|endoftext|>": False,
            "<|assistant|>": True,
            "<|system|>": True,
            "<|end|>": True,
            "<|user|>": True,
        },
    ),
    "gemma": _Style(
        kind="sentencepiece",
        bos="<bos>",
        eos="<eos>",
        unk="<unk>",
        pad="<pad>",
        add_bos=True,
        chat_template=GEMMA2_TEMPLATE,
        specials=("<pad>", "<eos>", "<bos>", "<unk>"),
        controls={"<start_of_turn>": False, "<end_of_turn>": False},
    ),
    "plain": _Style(
        kind="byte",
        bos="<|endoftext|>",
        eos="<|endoftext|>",
        unk="<|endoftext|>",
        pad=None,
        add_bos=False,
        chat_template=None,
        specials=(),
        controls={"<|endoftext|>": False},
    ),
}

TOKENIZER_STYLES: tuple[str, ...] = tuple(_STYLES)

# --------------------------------------------------------------------------------------- corpus

_COLOURS = ["red", "green", "blue", "yellow", "white", "black", "brown", "orange", "purple", "grey"]
_SHAPES = ["circle", "square", "triangle", "star"]
_SUBJECTS = [
    "dog", "cat", "man", "woman", "child", "bird", "horse", "car", "boat", "train",
    "girl", "boy", "bicycle", "bus", "cow", "sheep",
]  # fmt: skip
_ACTIONS = [
    "sits on the grass", "runs along the beach", "stands in the snow", "jumps over a fence",
    "waits at the station", "plays in the park", "rides down the street", "sleeps on a bench",
    "looks at the camera", "walks past a building", "swims in the lake", "eats an apple",
]  # fmt: skip
_EXTRA = [
    "What is the capital of France?", "The capital of France is Paris.",
    "Describe the image.", "Describe this picture in one sentence.", "What is in the picture?",
    "Write a short caption.", "Caption:", "A photo of", "Instruct: describe the image. Output:",
    "You are a helpful assistant.", "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "system", "user", "assistant", "Two dogs play together, and 3 cats watch them!",
    "Is it a red square or a blue circle? It's a star; 100% sure.",
]  # fmt: skip


def caption_corpus() -> list[str]:
    """The few hundred caption-like sentences the tiny tokenizers are trained on (deterministic)."""
    lines: list[str] = []
    for i, colour in enumerate(_COLOURS):
        for j, shape in enumerate(_SHAPES):
            side = "left" if (i + j) % 2 else "right"
            lines.append(f"A {colour} {shape} on the {side}.")
            lines.append(f"a small {colour} {shape} in the middle of the image")
    for i, subject in enumerate(_SUBJECTS):
        for j, action in enumerate(_ACTIONS):
            if (i + j) % 3 == 0:
                colour = _COLOURS[(i * 7 + j) % len(_COLOURS)]
                lines.append(f"A {colour} {subject} {action}.")
                lines.append(f"Two {subject}s {action.replace('s ', ' ', 1)} together.")
    return lines + _EXTRA


# ------------------------------------------------------------------------------------- tokenizers


def tiny_tokenizer(style: str, path: str | Path | None = None) -> Any:
    """A small tokenizer (about 640 tokens) in the conventions of a real family, built offline.

    ``style`` is one of ``TOKENIZER_STYLES`` (see the module docstring). Returns a
    ``PreTrainedTokenizerFast``; when ``path`` is given it is also saved there
    (``save_pretrained``), so ``AutoTokenizer.from_pretrained(path)`` loads it back.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if style not in _STYLES:
        raise ValueError(f"unknown tokenizer style {style!r}; choose one of {', '.join(TOKENIZER_STYLES)}")
    s = _STYLES[style]
    corpus = caption_corpus()

    if s.kind == "byte":
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=VOCAB_SIZE,
            special_tokens=list(s.specials),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tk.train_from_iterator(corpus, trainer=trainer)
    else:
        tk = _sentencepiece_like(corpus, s.specials, s.unk or s.specials[0])
        if s.add_bos:
            tk.post_processor = processors.TemplateProcessing(
                single=f"{s.bos} $A",
                pair=f"{s.bos} $A {s.bos} $B",
                special_tokens=[(s.bos, tk.token_to_id(s.bos))],
            )
    tk.add_special_tokens(
        [AddedToken(tok, special=True, normalized=False, rstrip=strip) for tok, strip in s.controls.items()]
    )

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=s.bos,
        eos_token=s.eos,
        unk_token=s.unk,
        pad_token=s.pad,
        clean_up_tokenization_spaces=False,
    )
    if s.chat_template is not None:
        tokenizer.chat_template = s.chat_template
    if path is not None:
        tokenizer.save_pretrained(str(path))
    return tokenizer


def _sentencepiece_like(corpus: list[str], specials: tuple[str, ...], unk: str) -> Any:
    """A Llama/Phi-3 style BPE: ``▁`` for spaces (prepended to the first word), byte fallback."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    # SentencePiece learns pieces within words (split=True) but encodes with split=False.
    scratch = Tokenizer(models.BPE(unk_token=unk))
    scratch.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    alphabet = sorted({ch for line in corpus for ch in line} | {"▁"})
    budget = VOCAB_SIZE - 256  # the byte-fallback tokens come on top
    trainer = trainers.BpeTrainer(
        vocab_size=budget, special_tokens=list(specials), initial_alphabet=alphabet, show_progress=False
    )
    scratch.train_from_iterator(corpus, trainer=trainer)
    trained = json.loads(scratch.to_str())["model"]

    # Llama layout: specials, then <0x00>..<0xFF> (byte fallback), then the learnt pieces.
    vocab: dict[str, int] = {}
    for tok in [*specials, *(f"<0x{b:02X}>" for b in range(256))]:
        vocab[tok] = len(vocab)
    for tok, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(tok, len(vocab))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in trained["merges"]]

    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tk.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tk.add_special_tokens(list(specials))
    return tk


# ----------------------------------------------------------------------------------- checkpoints

#: the size of every tiny decoder: width 64, 2 layers, 4 heads, 256 positions
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
)
#: arch -> (config class name, tokenizer style, config kwargs)
ARCHITECTURES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "smollm", {**TINY, "num_key_value_heads": 2, "tie_word_embeddings": True}),
    "qwen2": ("Qwen2Config", "chatml", {**TINY, "num_key_value_heads": 2, "tie_word_embeddings": True}),
    "phi": ("PhiConfig", "plain", {**TINY, "partial_rotary_factor": 0.5}),
    "phi3": ("Phi3Config", "phi3", {**TINY, "num_key_value_heads": 4, "original_max_position_embeddings": 256}),
    "gpt2": ("GPT2Config", "plain", dict(n_embd=64, n_layer=2, n_head=4, n_positions=256)),
}  # fmt: skip


def tiny_decoder_checkpoint(arch: str, path: str | Path | None = None) -> str:
    """Save a tiny random causal LM of architecture ``arch`` with its tokenizer; return the folder.

    ``arch`` is one of ``ARCHITECTURES`` (``llama``, ``qwen2``, ``phi``, ``phi3``, ``gpt2``): the
    real transformers config class with hidden size 64, 2 layers, 4 heads, the vocabulary of the
    matching tokenizer style, random weights (seed 0). ``path=None`` uses a new temporary folder.
    """
    import transformers

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    config_class, style, kwargs = ARCHITECTURES[arch]
    config = getattr(transformers, config_class)(**kwargs)
    return tiny_decoder_checkpoint_from_config(config, style, path)


def tiny_decoder_checkpoint_from_config(
    config: Any, tokenizer_style: Any, path: str | Path | None = None
) -> str:
    """Like ``tiny_decoder_checkpoint`` for a config you give (any ``PretrainedConfig`` that
    ``AutoModelForCausalLM`` knows); keep it small, the weights are random (seed 0, drawn without
    reseeding torch's global generator).

    ``tokenizer_style`` is one of ``TOKENIZER_STYLES`` (``tiny_tokenizer(tokenizer_style)`` is
    saved with the model) or a tokenizer you built, e.g. a ``tiny_tokenizer`` given another chat
    template or EOS. The config's vocabulary size and BOS/EOS/pad ids are set from it."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    path = Path(path) if path is not None else Path(tempfile.mkdtemp(prefix="vlmkit-tiny-"))
    path.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer_style, str):
        tokenizer = tiny_tokenizer(tokenizer_style, path)
    else:  # a tokenizer you built, e.g. a tiny_tokenizer with another EOS or chat template
        tokenizer = tokenizer_style
        if path is not None:
            tokenizer.save_pretrained(str(path))
    config.vocab_size = len(tokenizer)
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config, attr, getattr(tokenizer, attr))
    with torch.random.fork_rng(devices=[]):  # the caller's random stream stays as it was
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig.from_model_config(config)
    model.save_pretrained(str(path))
    return str(path)
