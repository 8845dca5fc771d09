"""The memory table of docs/training.md: the largest batch that fits each card, computed with the formula of
``vlmkit.train.memory`` (not measured on the cards; ``benchmarks/gpu_throughput.py`` measures peak
memory where a GPU is available).

    python benchmarks/memory_table.py      # a few seconds of CPU per decoder

``--smoke``: the same computation for tiny decoders of the three families (width 64, 2 layers):
checks the script, its figures mean nothing. ``--json PATH``: one JSON line per decoder.
"""

from __future__ import annotations

import sys

import harness

#: the decoders of the table (``harness.DECODERS``: the sizes of the published configs)
DECODERS = ("SmolLM2-135M", "Qwen2.5-0.5B", "Qwen2.5-1.5B")
#: SiglipVisionModel(SiglipVisionConfig()): frozen, but on the GPU with the rest of the model
SIGLIP_BASE_PARAMS = 92_884_224
CARDS = (
    ("16 GiB (T4, V100-16)", 16),
    ("24 GiB (RTX 4090, A10)", 24),
    ("48 GiB (L40S)", 48),
    ("80 GiB (A100, H100)", 80),
)


def largest_batches(config, batches=(8, 16, 32, 64, 128, 256), tokens: int = 16 + 30 + 2) -> dict:
    """``{"a": A, "fits": {card: [without, with gradient checkpointing]}}``: the largest batch of
    ``batches`` that fits each card in bf16 (None: none fits); a 16-token prefix and 30-token
    captions (48 positions with the start and end tokens)."""
    from vlmkit.train.memory import GIB, activation_bytes_per_token, estimate

    a = activation_bytes_per_token(config, "bf16")
    total = {  # bytes of a step, whatever the card (each estimate builds the model on the meta device)
        (gc, b): estimate(
            config, batch=b, tokens=tokens, gradient_checkpointing=gc, per_token=a,
            encoder_params=SIGLIP_BASE_PARAMS,
        ).total
        for gc in (False, True)
        for b in batches
    }  # fmt: skip
    fits = {
        card: [max((b for b in batches if total[gc, b] <= gib * GIB), default=None) for gc in (False, True)]
        for card, gib in CARDS
    }
    return {"a_bytes_per_token_layer": a, "fits": fits}


def main(argv=None) -> int:
    args = harness.parser(__doc__, threads=None).parse_args(argv)
    out = harness.start(args, "memory_table")
    lines = [
        "| decoder (+ SigLIP-base, LoRA r16), bf16 | A: bytes/token/layer (measured) | "
        + " | ".join(card for card, _ in CARDS)
        + " |",
        "|---|---:|" + "---:|" * len(CARDS),
    ]
    for name in DECODERS:
        figures = largest_batches(harness.decoder_config(name, tiny=args.smoke))
        out.row(name, **figures)
        cells = [" / ".join(str(b) if b else "-" for b in both) for both in figures["fits"].values()]
        lines.append(f"| {name} | {figures['a_bytes_per_token_layer']:,.0f} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    return out.finish(DECODERS)


if __name__ == "__main__":
    sys.exit(main())
