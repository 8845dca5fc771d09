"""Cross-attention conditioning on a vlmkit model, for the quality benchmark's prefix-vs-cross-attention row.

The upstream old architecture (``VisionEncoderDecoderModel``: SigLIP + GPT-2 with cross-attention
layers added to every decoder block, randomly initialised) cannot be trained here: the Hub is out
of reach, and from random weights it captions nothing in minutes. What can be compared at equal
compute is the *conditioning*: the same frozen EfficientNet-Lite0 features, the same projection to
16 tokens of the LM's width, the same SmolLM2-135M with the same LoRA, the same data and loop, and
the image reaching the LM either as a prefix (vlmkit) or through cross-attention in every decoder
layer (VisionEncoderDecoder's way). ``attach`` turns a built ``PrefixConditioningVLM`` into the
second kind without touching vlmkit:

- the prefix is dropped (no image slots in the token sequence: the LM runs on prompt + caption);
- the projection's output is kept as the cross-attention memory (a hook on the projection, so the
  model's own ``forward`` and ``generate``, KV cache included, run unchanged);
- every decoder layer gets a cross-attention branch beside its self-attention, reading the layer's
  normalised input as queries and the memory as keys and values, its output scaled by
  ``tanh(gate)`` with the gate starting at 0, so at step 0 the LM is exactly the pretrained one.
  VisionEncoderDecoder adds its cross-attention ungated and randomly initialised; the gate is
  Flamingo's gentler start and favours cross-attention here (a zero-initialised output projection
  instead took the loss from 5 to 9 in four steps: Adam's first steps move every weight of it at
  once). The new layers (40M parameters for SmolLM2-135M's 30 layers) train at the projection's
  learning rate.

Not a script: a module of ``benchmarks/quality.py`` (its ``xattn`` recipes), run by its
``--smoke`` and tested in ``tests/benchmarks/test_cross_attention.py``.
"""

from __future__ import annotations

import torch
from torch import nn


class CrossAttention(nn.Module):
    """Multi-head attention of ``hidden`` [B, T, D] over ``memory`` [B, M, D]; no mask (every
    position sees the whole image)."""

    def __init__(self, width: int, heads: int, gated: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(width)
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        # tanh(0) = 0: the pretrained LM at step 0; ungated (VisionEncoderDecoder): a fixed 1
        self.gate = nn.Parameter(torch.zeros(())) if gated else None

    def forward(self, hidden: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        b, t, d = hidden.shape
        memory = self.norm(memory.to(hidden.dtype))

        def split(x):
            return x.view(b, x.shape[1], self.heads, d // self.heads).transpose(1, 2)

        out = nn.functional.scaled_dot_product_attention(
            split(self.q(hidden)), split(self.k(memory)), split(self.v(memory))
        )
        out = self.o(out.transpose(1, 2).reshape(b, t, d))
        return out if self.gate is None else self.gate.tanh() * out


def decoder_attentions(lm: nn.Module) -> list[nn.Module]:
    """The self-attention module of every decoder layer (those holding ``q_proj`` and ``o_proj``)."""
    found = [m for m in lm.modules() if hasattr(m, "q_proj") and hasattr(m, "o_proj")]
    if not found:
        raise ValueError(f"no self-attention modules with q_proj/o_proj in {type(lm).__name__}")
    return found


def attach(model, gated: bool = True) -> list[nn.Parameter]:
    """Make ``model`` condition by cross-attention instead of a prefix; returns the new parameters
    (train them with the projection's learning rate). The modules live on ``model.cross_attention``.
    ``gated=False`` adds them as VisionEncoderDecoder does: no gate, the LM perturbed from step 0."""
    config = model.language_model.config
    width, heads = config.hidden_size, config.num_attention_heads
    attentions = decoder_attentions(model.lm)
    model.cross_attention = nn.ModuleList(CrossAttention(width, heads, gated) for _ in attentions)
    model.cross_attention.to(device=model.device)
    model.num_prefix_tokens = 0  # tokenize makes no image slots: the LM sees prompt + caption only
    state: dict[str, torch.Tensor] = {}

    def keep_memory(module, args, output):
        state["memory"] = output

    def add_cross_attention(block):
        def hook(module, args, kwargs, output):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            attn_out, *rest = output
            return (attn_out + block(hidden, state["memory"]), *rest)

        return hook

    model.projection.register_forward_hook(keep_memory)
    for attention, block in zip(attentions, model.cross_attention, strict=True):
        attention.register_forward_hook(add_cross_attention(block), with_kwargs=True)
    return list(model.cross_attention.parameters())
