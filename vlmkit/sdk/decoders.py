"""``TransformersDecoderSpec``: the common Hugging Face path for decoder plugins.

A family plugin subclasses it and declares data (``model_types``, ``lora_targets``,
``layer_class``, checkpoints); loading, prompt formatting, stop tokens and LoRA target resolution
are done here, from what the loaded config, model and tokenizer say about themselves. This module
knows no family by name.

How an example is laid out (see ``Formatted``)::

    chat:   before = <template up to the user's content>       e.g. "<|im_start|>system\\n<|im_end|>\\n<|im_start|>user\\n"
            [image prefix embeddings]
            after  = prompt + end of user turn + assistant header    "Describe.<|im_end|>\\n<|im_start|>assistant\\n"
            target = caption + end-of-turn token                      "A red circle.<|im_end|>"
    plain:  before = the tokens the tokenizer puts before any text (BOS); when it puts none
                     (GPT-2, Qwen2, SmolLM2), one start token: BOS if it has one, else EOS
            [image prefix embeddings]
            after  = prompt (may be empty)
            target = caption + EOS                                    (" " between prompt and caption)

The chat split is read off the tokenizer's own template: the template is rendered with a sentinel
in place of the image and cut there. Every piece is tokenized *in its context* (the text before it
included, then removed), so that with the image left out, ``before + after + target`` are exactly
the ids the tokenizer gives for the whole conversation, and generation (``caption=None``) sees
exactly the ``before``/``after`` that training saw.

Pad tokens: a tokenizer without one (GPT-2, Phi-2) gets ``pad = eos``; SmolLM2's own pad already is
its EOS. That is safe because vlmkit never finds padding or label positions by comparing ids with
the pad id: labels are built from ``Formatted.target`` (so the EOS/end token that closes a caption
is always a target) and the attention mask from the sequence lengths.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from vlmkit.core.contracts import STYLES, DecoderSpec, Formatted
from vlmkit.core.errors import ConfigError, PluginError
from vlmkit.core.placement import torch_dtype

# Stand-ins rendered through the chat template, then cut out. Plain ASCII, so no template escapes
# or trims them.
IMAGE_SENTINEL = "[[vlmkit-image]]"
CAPTION_SENTINEL = "[[vlmkit-caption]]"


@dataclass(frozen=True)
class _Context:
    """Everything around the caption for one (tokenizer, prompt, style, system prompt)."""

    before: tuple[int, ...]
    after: tuple[int, ...]
    #: the text the caption follows (with no image); its ids are ``text_ids``
    text: str
    text_ids: tuple[int, ...]
    #: text between ``text`` and the caption (" " after a plain prompt)
    sep: str
    #: token(s) that end the caption: the end-of-turn token (chat) or EOS (plain)
    end: tuple[int, ...]


class TransformersDecoderSpec(DecoderSpec):
    """A ``DecoderSpec`` for causal LMs loaded with ``AutoModelForCausalLM``/``AutoTokenizer``.

    Subclasses set ``name``, ``description``, ``default_checkpoint``, ``model_types``,
    ``lora_targets``, ``layer_class`` (and ``layer_classes`` when the family has several block
    classes). A family with named checkpoints overrides ``resolve_checkpoint``.
    """

    #: more transformer block class names, when the family spans several architectures
    layer_classes: ClassVar[tuple[str, ...]] = ()
    #: extra variables for the chat template (e.g. to pin a date the template would print)
    chat_template_kwargs: ClassVar[Mapping[str, Any]] = {}
    #: extra ``peft.LoraConfig`` arguments the family needs (e.g. ``{"fan_in_fan_out": True}`` for
    #: layers that store their weights transposed)
    lora_options: ClassVar[Mapping[str, Any]] = {}

    # ------------------------------------------------------------------------------ loading

    def load(self, checkpoint: str | None = None, *, revision: str | None = None, dtype: Any = None):
        """``(model, tokenizer)`` for ``checkpoint`` (default ``default_checkpoint``).

        ``checkpoint`` is a hub id, a local folder or one of ``checkpoints``. The config is read
        first and a ``model_type`` outside ``model_types`` is refused before any weight is loaded.
        ``dtype`` is a ``torch.dtype``, its name (``"bfloat16"``) or ``"auto"``; ``None`` means
        float32. The tokenizer always has a pad token (its EOS when it has none of its own).
        """
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        name = checkpoint or self.default_checkpoint
        if not name:
            raise PluginError(f"decoder {self.name!r} has no default checkpoint; name one")
        source = self.resolve_checkpoint(name)
        _check_local_path(source, name)
        config = self._hub_call(name, "config", lambda: AutoConfig.from_pretrained(source, revision=revision))
        self.check_model_type(config, name)
        weights_dtype = _torch_dtype(dtype)
        model = self._hub_call(
            name,
            "weights",
            lambda: AutoModelForCausalLM.from_pretrained(
                source, revision=revision, config=config, dtype=weights_dtype
            ),
        )
        tokenizer = self._hub_call(
            name, "tokenizer", lambda: AutoTokenizer.from_pretrained(source, revision=revision)
        )
        self.prepare(model, tokenizer)
        self.resolve_layer_class(model)  # a misspelt layer_class fails here, not in FSDP wrapping
        return model, tokenizer

    def resolve_checkpoint(self, checkpoint: str) -> str:
        """What ``from_pretrained`` gets for ``checkpoint``: a hub id or a local folder.

        The base class passes hub ids and paths through. A family that declares ``checkpoints``
        overrides this to turn each name into a local folder (converting once if needed).
        """
        if checkpoint in self.checkpoints:
            raise PluginError(
                f"decoder {self.name!r} declares checkpoint {checkpoint!r} but does not resolve it"
            )
        return checkpoint

    def check_model_type(self, config: Any, checkpoint: str) -> None:
        """Refuse a checkpoint of another family, before its weights are loaded."""
        model_type = getattr(config, "model_type", None)
        if model_type not in self.model_types:
            raise PluginError(
                f"checkpoint {checkpoint!r} is a {model_type!r} model; decoder {self.name!r} accepts "
                f"model_type {', '.join(repr(t) for t in self.model_types)}. Pick the decoder plugin of its family "
                "(see 'vlmkit plugins list')"
            )

    def prepare(self, model: Any, tokenizer: Any) -> None:
        """Family fix-ups after loading. The base sets ``pad = eos`` when the tokenizer has no pad
        (see the module docstring for why that is safe) and tells the model's configs."""
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token is None:
                raise PluginError(
                    f"the tokenizer of decoder {self.name!r} has neither a pad nor an EOS token"
                )
            tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id

    def _hub_call(self, checkpoint: str, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except (OSError, ValueError, ImportError) as exc:  # hub/network/file errors all land here
            reason = " ".join(str(exc).split())
            if len(reason) > 240:
                reason = reason[:237] + "..."
            named = f", or a named checkpoint ({', '.join(self.checkpoints)})" if self.checkpoints else ""
            raise PluginError(
                f"cannot load the {what} of decoder checkpoint {checkpoint!r} ({self.name}): {reason}. "
                f"Without the Hugging Face Hub, pass a local folder saved with save_pretrained{named}; "
                "HF_HUB_OFFLINE=1 makes hub ids fail fast"
            ) from exc

    # ------------------------------------------------------------------------------ formatting

    def resolve_style(self, tokenizer: Any, style: str = "auto") -> str:
        """``chat`` or ``plain``: ``auto`` is chat exactly when the tokenizer has a chat template."""
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if style == "auto":
            return "chat" if has_template else "plain"
        if style == "chat" and not has_template:
            raise PluginError(
                f"style 'chat': the tokenizer of this {self.name} checkpoint has no chat template; use 'plain'"
            )
        if style not in STYLES:
            raise PluginError(f"unknown prompt style {style!r}; choose one of {', '.join(STYLES)}")
        return style

    def format(
        self,
        tokenizer: Any,
        prompt: str,
        caption: str | None,
        style: str = "auto",
        *,
        system_prompt: str | None = None,
    ) -> Formatted:
        """Token ids around the image for one example (see the module docstring for the layout).

        ``caption=None`` formats for generation; ``before``/``after`` are then identical to those
        of every training example with the same prompt. The caption is stripped of surrounding
        whitespace; ``target`` is its ids followed by the end token(s).

        ``system_prompt=None`` means *no system text*: the template's own default system prompt
        (SmolLM2 and Qwen2.5 inject one of 20-30 tokens when none is given) is replaced by an
        empty system turn, whichever of "no system message" and "empty system message" renders
        shorter. The image, not a persona, is the context; every token of it is paid for at each
        training step and each generation. Pass a string to use a system prompt.
        """
        style = self.resolve_style(tokenizer, style)
        ctx = self._context(tokenizer, prompt or "", style, system_prompt)
        if caption is None:
            return Formatted(list(ctx.before), list(ctx.after))
        return Formatted(
            list(ctx.before), list(ctx.after), self._caption_ids(tokenizer, ctx, caption.strip())
        )

    def stop_token_ids(self, tokenizer: Any, style: str = "auto") -> list[int]:
        """The end token that closes a target (end of turn or EOS), then EOS if different."""
        style = self.resolve_style(tokenizer, style)
        ids = list(self._context(tokenizer, "", style, None).end)
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
            ids.append(tokenizer.eos_token_id)
        return ids

    def _caption_ids(self, tokenizer: Any, ctx: _Context, caption: str) -> list[int]:
        if caption and any(token in caption for token in _special_tokens(tokenizer)):
            # a caption that writes out "<|im_end|>" means those characters, not the end of the
            # turn: as a control token it would teach the model to stop (or start a turn) mid-caption
            ids = list(
                tokenizer(ctx.sep + caption, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            )
        elif caption:
            # Tokenize the caption where it stands (after the prompt/assistant header), so its ids
            # are the ones the model would see in running text, not those of a fresh string.
            full = _encode(tokenizer, ctx.text + ctx.sep + caption)
            n = len(ctx.text_ids)
            ids = full[n:] if tuple(full[:n]) == ctx.text_ids else _encode(tokenizer, ctx.sep + caption)
        else:
            ids = []
        return ids + list(ctx.end)

    def _context(self, tokenizer: Any, prompt: str, style: str, system_prompt: str | None) -> _Context:
        prompt = prompt.rstrip(" ")
        template = getattr(tokenizer, "chat_template", None)
        extra = tuple(sorted(self.chat_template_kwargs.items()))
        key = (style, prompt, system_prompt, template, extra, tokenizer.eos_token_id, len(tokenizer))
        try:
            per_tokenizer = _CONTEXTS.setdefault(tokenizer, {})
        except TypeError:  # not weak-referenceable: no cache
            per_tokenizer = {}
        if key not in per_tokenizer:
            build = self._chat_context if style == "chat" else self._plain_context
            per_tokenizer[key] = build(tokenizer, prompt, system_prompt)
        return per_tokenizer[key]

    def _plain_context(self, tokenizer: Any, prompt: str, system_prompt: str | None) -> _Context:
        if system_prompt is not None:
            raise PluginError("a system prompt needs the 'chat' style (the plain style has no system turn)")
        if tokenizer.eos_token_id is None:
            raise PluginError(
                f"the tokenizer of this {self.name} checkpoint has no EOS token to end captions"
            )
        after = _encode(tokenizer, prompt)
        sep = " " if prompt and not prompt[-1].isspace() else ""
        return _Context(
            before=tuple(_plain_start(tokenizer)),
            after=tuple(after),
            text=prompt,
            text_ids=tuple(after),
            sep=sep,
            end=(tokenizer.eos_token_id,),
        )

    def _chat_context(self, tokenizer: Any, prompt: str, system_prompt: str | None) -> _Context:
        user = {"role": "user", "content": IMAGE_SENTINEL + prompt}
        if system_prompt is None:
            variants = [[], [{"role": "system", "content": ""}]]
        else:
            variants = [[{"role": "system", "content": system_prompt}]]
        rendered: list[tuple[list[dict[str, str]], str]] = []
        errors: list[str] = []
        for system in variants:
            try:
                rendered.append((system, self._render(tokenizer, [*system, user], generation=True)))
            except Exception as exc:  # noqa: BLE001 - templates raise what they like (e.g. no system role)
                errors.append(f"{type(exc).__name__}: {exc}")
        if not rendered:
            raise PluginError(
                f"the chat template of this {self.name} tokenizer cannot render the prompt: {errors[0]}"
            )
        for _, text in rendered:
            if text.count(IMAGE_SENTINEL) != 1:
                raise PluginError(
                    f"the chat template of this {self.name} tokenizer does not copy the user message verbatim; "
                    "use style 'plain'"
                )
        system, text = min(rendered, key=lambda r: len(_encode(tokenizer, r[1].split(IMAGE_SENTINEL)[0])))
        before_text, after_text = text.split(IMAGE_SENTINEL)

        before = _encode(tokenizer, before_text)
        context = before_text + after_text
        context_ids = _encode(tokenizer, context)
        if context_ids[: len(before)] != before:
            # A token spans the image's place: SentencePiece tokenizers (Llama-2, Mistral) make
            # "[INST] " + "Describe" one "▁Describe". Cut the conversation's own ids at the last
            # token boundary before the image, rather than keep a lone "▁" it never contains.
            cut = _token_boundary(tokenizer, context, len(before_text))
            if cut is not None:
                before = context_ids[:cut]
        if context_ids[: len(before)] == before:
            after = context_ids[len(before) :]
        else:  # the prompt merged with the template's text: keep the pieces apart
            after = _encode(tokenizer, after_text)
            context_ids = before + after

        # The assistant turn: what the template writes between the generation prompt and the
        # caption (usually nothing), and after it (the end-of-turn token, maybe a newline/EOS).
        assistant = {"role": "assistant", "content": CAPTION_SENTINEL}
        full = self._render(tokenizer, [*system, user, assistant], generation=False)
        if not full.startswith(text) or full.count(CAPTION_SENTINEL) != 1:
            raise PluginError(
                f"the chat template of this {self.name} tokenizer renders an assistant turn that does not "
                "continue its generation prompt; use style 'plain'"
            )
        sep, end_text = full[len(text) :].split(CAPTION_SENTINEL)
        return _Context(
            before=tuple(before),
            after=tuple(after),
            text=context,
            text_ids=tuple(context_ids),
            sep=sep,
            end=(_end_of_turn(tokenizer, end_text),),
        )

    def _render(self, tokenizer: Any, messages: list[dict[str, str]], *, generation: bool) -> str:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation, **self.chat_template_kwargs
        )

    # ------------------------------------------------------------------------------ LoRA, FSDP

    def resolve_lora_targets(self, model: Any, targets: Sequence[str] | None = None) -> list[str]:
        """The LoRA target names for ``model``: ``targets`` when given, else ``lora_targets`` (its
        entry for the model's ``model_type`` when it is a mapping). Every name must be a module
        LoRA can adapt: a misspelt one fails here, naming the modules there are, rather than
        leaving a layer silently unadapted.

        Returns last name components (``q_proj``), which peft's ``target_modules`` matches as
        suffixes: apply LoRA to the language model alone, since vision encoders use the same names.
        """
        model_type = getattr(getattr(model, "config", None), "model_type", "?")
        declared = self.lora_targets
        if targets is None and isinstance(declared, Mapping):
            if model_type not in declared:
                raise PluginError(
                    f"decoder {self.name!r} declares LoRA targets for model_type "
                    f"{', '.join(map(repr, declared))}, not for this {model_type!r} model"
                )
            declared = declared[model_type]
        wanted = tuple(targets if targets is not None else declared)
        present = list(dict.fromkeys(leaf for leaf, _ in _adaptable_modules(model)))
        missing = [t for t in wanted if t not in present]
        if missing or not wanted:
            what = "LoRA targets" if targets is not None else f"{self.name}.lora_targets"
            raise PluginError(
                f"{what}: {', '.join(missing) or 'none declared'} match no linear module of this "
                f"{model_type!r} model; modules LoRA can adapt there: {', '.join(present[:12]) or 'none'}"
            )
        return list(wanted)

    def lora_kwargs(self, model: Any, targets: Sequence[str] | None = None) -> dict[str, Any]:
        """Family-specific ``peft.LoraConfig`` arguments for ``model``::

            LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, **spec.lora_kwargs(lm))

        ``target_modules`` from ``resolve_lora_targets``, plus the family's ``lora_options``.
        """
        return {**self.lora_options, "target_modules": self.resolve_lora_targets(model, targets)}

    def resolve_layer_class(self, model: Any) -> str:
        """Class name of ``model``'s transformer block (FSDP auto-wrap): ``layer_class`` or one of
        ``layer_classes``; only when the plugin declares none, the model's own ``_no_split_modules``.
        A declared class the model lacks (a typo) is an error, never silently replaced."""
        present = {type(m).__name__ for m in model.modules()}
        declared = [c for c in (self.layer_class, *self.layer_classes) if c]
        own = sorted(getattr(model, "_no_split_modules", None) or ())
        for candidate in declared or own:
            if candidate in present:
                return candidate
        if declared:
            blocks = ", ".join(c for c in own if c in present) or "none found"
            raise PluginError(
                f"decoder plugin {self.name!r} declares layer_class {', '.join(declared)}, but this "
                f"{type(model).__name__} has no such module (its block class: {blocks})"
            )
        raise PluginError(f"no transformer block class (none declared) in this {self.name} model")


# ---------------------------------------------------------------------------------- helpers

_CONTEXTS: weakref.WeakKeyDictionary[Any, dict[tuple, _Context]] = weakref.WeakKeyDictionary()


_SPECIALS: weakref.WeakKeyDictionary[Any, frozenset[str]] = weakref.WeakKeyDictionary()


def _special_tokens(tokenizer: Any) -> frozenset[str]:
    """The text of every special token (``<|im_end|>``, ``<end_of_turn>``, ...): the named ones and
    the added tokens marked special, which ``all_special_tokens`` may leave out."""
    if tokenizer not in _SPECIALS:
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        named = set(tokenizer.all_special_tokens) | {t.content for t in added.values() if t.special}
        _SPECIALS[tokenizer] = frozenset(t for t in named if t)
    return _SPECIALS[tokenizer]


def _encode(tokenizer: Any, text: str) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _token_boundary(tokenizer: Any, text: str, position: int) -> int | None:
    """How many of ``text``'s tokens end at or before character ``position``; ``None`` when the
    tokenizer gives no offsets (slow tokenizers)."""
    try:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, ValueError):
        return None
    return sum(1 for _, end in offsets if end <= position)


def _special_prefix(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts before any text when it adds special tokens (BOS), maybe none."""
    bare = _encode(tokenizer, "a")
    full = list(tokenizer("a")["input_ids"])
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start]
    return []


def _plain_start(tokenizer: Any) -> list[int]:
    """What the plain layout puts before the image: the tokenizer's own BOS prefix, else one start
    token (BOS, else EOS - the document separator GPT-2-style models were trained with).

    Never nothing: at position 0 the image prefix would take the place of the token causal LMs
    park attention on (the "attention sink"), and the first image token would be seen with no
    context. Measured on the demo recipe (SmolLM2-135M-Instruct, EfficientNet-Lite0 pooled to 16
    tokens, 40 steps of 16, same seed): with the image at position 0, eval loss 1.00 and none of 64
    held-out captions right; with a start token, eval loss 0.14 and 70% exactly right.
    """
    prefix = _special_prefix(tokenizer)
    if prefix:
        return prefix
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return [start]


def _end_of_turn(tokenizer: Any, end_text: str) -> int:
    """The first special token the template writes after the assistant's content, when only
    whitespace precedes it (``<|im_end|>``, ``<|end|>``, ``<|eot_id|>``); else EOS."""
    special = set(tokenizer.all_special_ids)
    special |= {i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if tok.special}
    ids = _encode(tokenizer, end_text)
    for i, tid in enumerate(ids):
        if tid in special:
            if not tokenizer.decode(ids[:i]).strip():
                return tid
            break
    if tokenizer.eos_token_id is None:
        raise PluginError(
            "the chat template ends the assistant turn with no special token and there is no EOS"
        )
    return tokenizer.eos_token_id


def _adaptable_modules(model: Any):
    """(last name component, module) for every module peft's LoRA can adapt."""
    import torch.nn as nn

    kinds = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d)
    for name, module in model.named_modules():
        if name and (isinstance(module, kinds) or type(module).__name__ == "Conv1D"):
            yield name.rsplit(".", 1)[-1], module


def _torch_dtype(dtype: Any) -> Any:
    """``dtype`` for ``from_pretrained``: ``auto`` as it is, else a torch dtype (``torch_dtype``)."""
    if dtype == "auto":
        return dtype
    try:
        return torch_dtype(dtype)
    except ConfigError as exc:
        raise PluginError(f"{exc} or auto") from None


def _check_local_path(source: str, checkpoint: str) -> None:
    looks_local = source.startswith(("/", "./", "../", "~")) or os.path.isabs(source)
    if looks_local and not Path(source).expanduser().exists():
        raise PluginError(f"decoder checkpoint {checkpoint!r}: no such folder {source}")
