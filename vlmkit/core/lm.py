"""What vlmkit needs of a decoder plugin's LM, checked by what the loaded model does when a model
is built, before any training. vlmkit feeds the LM embeddings (``inputs_embeds``), never token
ids (the image prefix has none), so: ``generate`` must start from them; what the model does to
token embeddings on its token-id path only (Falcon-H1's ``embedding_multiplier``) is measured
and applied by vlmkit; and peft's refusal of a LoRA target is one line naming it.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings

from vlmkit.core.errors import PluginError


def check_generate_takes_embeddings(lm, decoder: str) -> None:
    """``PluginError`` unless ``lm.generate`` can start from ``inputs_embeds``: transformers' own
    rule (``prepare_inputs_for_generation`` takes them), checked up front."""
    prepare = getattr(lm, "prepare_inputs_for_generation", None)
    if not callable(getattr(lm, "generate", None)) or (
        prepare is not None and "inputs_embeds" not in inspect.signature(prepare).parameters
    ):
        raise PluginError(
            f"decoder {decoder!r}: {type(lm).__name__}.generate cannot start from inputs_embeds (its "
            "prepare_inputs_for_generation takes no inputs_embeds), and vlmkit feeds the image as "
            "embeddings; the plugin's load must return a model whose generate takes them "
            "(docs/plugins.md, 'the generate requirement')"
        )


class _Reached(Exception):
    """Raised at the first block: the probe needs nothing past it."""


def token_embedding_scale(lm, block_classes, decoder: str) -> float:
    """The factor the model applies to its embedding module's output for token ids but not for
    ``inputs_embeds`` (1.0 for almost every family). Measured at the input of the first block for
    ids, their embeddings and zeros (what the forward adds to any input: GPT-2's positions);
    anything but a constant factor is a ``PluginError``."""
    import torch

    blocks = [m for m in lm.modules() if type(m).__name__ in set(block_classes)]
    if not blocks:
        raise PluginError(
            f"decoder {decoder!r}: no {' or '.join(block_classes) or 'layer_class'} block found"
        )
    embedding, seen = lm.get_input_embeddings(), []
    vocab = int(getattr(embedding, "num_embeddings", 0) or embedding.weight.shape[0])
    ids = (torch.arange(8) * 7 + 3).remainder(vocab)[None].to(embedding.weight.device)

    def first_block_input(module, args, kwargs):
        seen.append(args[0] if args else kwargs["hidden_states"])
        raise _Reached

    handle = blocks[0].register_forward_pre_hook(first_block_input, with_kwargs=True)
    was_training = lm.training
    try:
        with torch.no_grad(), _gathered_outside(lm, blocks[0]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lm.eval()
            embeds = embedding(ids)
            for inputs in ({"input_ids": ids}, {"inputs_embeds": embeds}, {"inputs_embeds": embeds * 0}):
                with contextlib.suppress(_Reached):
                    lm(**inputs, attention_mask=torch.ones_like(ids), use_cache=False)
    except Exception as exc:  # noqa: BLE001 - a model's forward raises what it likes: one line
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise PluginError(f"decoder {decoder!r}: {type(lm).__name__} fails on 8 token ids: {reason}") from exc
    finally:
        handle.remove()
        lm.train(was_training)
    if len(seen) != 3:
        raise PluginError(f"decoder {decoder!r}: {type(lm).__name__}'s forward skips its first block")
    by_ids, by_embeds, offset = (t.detach().double() for t in seen)
    a, b = by_ids - offset, by_embeds - offset
    scale = float((a * b).sum() / (b * b).sum().clamp_min(1e-30))
    tolerance = 16 * torch.finfo(seen[0].dtype).eps
    residual = float((a - scale * b).norm() / a.norm().clamp_min(1e-30))
    if residual > tolerance:
        raise PluginError(
            f"decoder {decoder!r}: on token ids, {type(lm).__name__} feeds its first block something other than "
            f"a multiple of its embedding module's output (relative residual {residual:.2g}); vlmkit feeds "
            "inputs_embeds and cannot reproduce it"
        )
    return 1.0 if abs(scale - 1.0) <= tolerance else scale


def _gathered_outside(lm, first_block):
    """DeepSpeed ZeRO-3 partitions weights from loading on: those the probe runs (before the
    first block: the embedding table, ...) are gathered for it."""
    inside = {id(p) for p in first_block.parameters()}
    partitioned = [p for p in lm.parameters() if hasattr(p, "ds_id") and id(p) not in inside]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned)


def add_lora(base, lora_config, decoder: str):
    """``peft.get_peft_model``; peft refusing a target (Mamba's ``out_proj``) is one ``PluginError``
    naming the target and its module type."""
    from peft import get_peft_model

    try:
        with warnings.catch_warnings():  # peft reads is_gradient_checkpointing, deprecated in transformers 5
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            return get_peft_model(base, lora_config)
    except (ValueError, TypeError, NotImplementedError, RuntimeError, KeyError) as exc:
        reason = " ".join(str(exc).split())
        targets = sorted(lora_config.target_modules or ())
        named = [t for t in targets if f"'{t}'" in reason or f'"{t}"' in reason] or targets
        modules = dict(base.named_modules())
        kinds = {
            t: sorted(
                {
                    f"{type(m).__name__} in {type(modules[n.rpartition('.')[0]]).__name__}"
                    for n, m in modules.items()
                    if "." in n and n.rpartition(".")[2] == t
                }
            )  # fmt: skip
            for t in named
        }
        what = ", ".join(f"{t} ({', '.join(kinds[t]) or 'no such module'})" for t in named)
        model_type = getattr(getattr(base, "config", None), "model_type", "?")
        raise PluginError(
            f"decoder {decoder!r}: peft refuses LoRA target {what} of this {model_type!r} model: "
            f"{reason[:300]}; remove it from lora_targets (or lora.targets)"
        ) from exc
