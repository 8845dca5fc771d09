"""README's memory table: the largest batch that fits each card, computed with the formula of
``vlmkit.train.memory`` (not measured on the cards; ``benchmarks/gpu_throughput.py`` measures peak
memory where a GPU is available).

    python benchmarks/memory_table.py      # a few seconds of CPU per decoder
"""

from __future__ import annotations

from typing import Any

import transformers

from vlmkit.train.memory import GIB, activation_bytes_per_token, estimate

#: the decoders of the table: transformers config class and the sizes of the published config
DECODERS: dict[str, tuple[str, dict[str, Any]]] = {
    "SmolLM2-135M": (
        "LlamaConfig",
        dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    ),
    "Qwen2.5-0.5B": (
        "Qwen2Config",
        dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
             num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    ),
    "Qwen2.5-1.5B": (
        "Qwen2Config",
        dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
             num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    ),
}  # fmt: skip
#: SiglipVisionModel(SiglipVisionConfig()): frozen, but on the GPU with the rest of the model
SIGLIP_BASE_PARAMS = 92_884_224
CARDS = (
    ("16 GiB (T4, V100-16)", 16),
    ("24 GiB (RTX 4090, A10)", 24),
    ("48 GiB (L40S)", 48),
    ("80 GiB (A100, H100)", 80),
)


def readme_table(batches=(8, 16, 32, 64, 128, 256), tokens: int = 16 + 30 + 2) -> str:
    """Markdown: the largest batch of ``batches`` that fits each card in bf16, without / with
    gradient checkpointing; a 16-token prefix and 30-token captions (48 positions with the start
    and end tokens)."""
    lines = [
        "| decoder (+ SigLIP-base, LoRA r16), bf16 | A: bytes/token/layer (measured) | "
        + " | ".join(card for card, _ in CARDS)
        + " |",
        "|---|---:|" + "---:|" * len(CARDS),
    ]
    for name, (config_class, sizes) in DECODERS.items():
        config = getattr(transformers, config_class)(**sizes)
        a = activation_bytes_per_token(config, "bf16")
        cells = []
        for _, gib in CARDS:
            fits = []
            for gc in (False, True):
                ok = [
                    b
                    for b in batches
                    if estimate(
                        config, batch=b, tokens=tokens, gradient_checkpointing=gc, per_token=a,
                        encoder_params=SIGLIP_BASE_PARAMS,
                    ).total
                    <= gib * GIB
                ]  # fmt: skip
                fits.append(str(max(ok)) if ok else "-")
            cells.append(f"{fits[0]} / {fits[1]}")
        lines.append(f"| {name} | {a:,.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(readme_table())
