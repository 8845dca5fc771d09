"""One epoch with length-grouped batches (``vlmkit train --group-by-length``) vs shuffled ones.

Captions of mixed length pad every batch to its longest caption. With ``--group-by-length``,
``vlmkit train`` batches similar lengths together (``vlmkit.train.data.LengthGroupedSampler``:
caption lengths in buckets of 16 characters; the shuffled indices are cut into groups of
``min(n // (4 * batch), 50)`` batches, each sorted by bucket). This runs the same epoch both ways
on the same model, the two samplers' batches interleaved, timed by process CPU time with one
thread and by wall clock, and counts the padding.

The model is the demo recipe (SmolLM2-135M from PyPI + LoRA, plain layout, 16 prefix tokens from
random cached features of EfficientNet-Lite0's shape, bf16 autocast where the CPU has bf16). The
captions are synthetic: English words, their count uniform in ``--words`` (default 5-40, the
spread of short COCO-style captions to long GPT-4o alt texts). With ``--examples 800`` and batch
16 the groups are 12 batches long; a dataset of 3,200 or more gets groups of 50, which pad less,
so the default measures a lower bound.

    python benchmarks/length_grouping.py [--examples 800] [--batch 16] [--words 5-40]

``--smoke``: a tiny random model of the same architectures, 32 captions of 2-12 words, batch 4:
checks the script, its figures mean nothing. ``--json PATH``: one JSON line per sampler, then the
ratio.
"""

from __future__ import annotations

import random
import statistics
import sys

import harness

# fmt: off
WORDS = (
    "a", "the", "photo", "of", "man", "woman", "child", "dog", "cat", "red", "blue", "green",
    "small", "large", "wooden", "table", "with", "on", "in", "near", "front", "sitting", "standing",
    "holding", "white", "black", "street", "park", "grass", "tree", "sky", "under", "next", "to",
    "two", "three", "people", "car", "bicycle", "bowl", "cup", "coffee", "plate", "food", "window",
    "light", "building", "old", "young",
)
# fmt: on


def main(argv=None) -> int:
    parser = harness.parser(__doc__, threads=1)
    parser.add_argument("--examples", type=int, default=800)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--words", default="5-40", help="caption length range in words, e.g. 5-40")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    args = parser.parse_args(argv)
    if args.smoke:
        args.examples, args.batch, args.words = 32, 4, "2-12"
    low, high = (int(x) for x in args.words.split("-"))
    out = harness.start(args, "length_grouping")

    import numpy as np
    import torch

    from vlmkit.core.contracts import CaptionExample
    from vlmkit.sdk.datasets import ListDataset
    from vlmkit.train.config import TrainConfig
    from vlmkit.train.data import CaptionTrainingSet, Collator, LengthGroupedSampler
    from vlmkit.train.trainer import make_optimizer, optimizer_param_groups

    rng = random.Random(args.seed)
    settings = {"format": "plain", "projection": {"type": "mlp", "reduction": "avgpool", "tokens": 16}}
    config = TrainConfig.model_validate(
        {
            "model": harness.model_config(args.smoke, harness.workdir("length-grouping"), **settings),
            "datasets": [{"name": "synthetic"}],  # the captions below; the config's learning rates
            "precision": args.precision,
        }
    )
    # the frozen base in fp32 under bf16 autocast, as in RESULTS.md's run
    model = harness.build_model(config.model, precision=args.precision, dtype="float32")
    examples = [
        CaptionExample(
            id=str(i),
            captions=[" ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."],
            image=None,
        )
        for i in range(args.examples)
    ]
    shape = (args.examples, model.encoder.num_tokens, model.encoder.feature_dim)
    features = np.random.default_rng(args.seed).standard_normal(shape, dtype=np.float32).astype(np.float16)
    data = CaptionTrainingSet(ListDataset(examples, "synthetic"), features=features)
    collator = Collator(model)
    optimizer = make_optimizer(optimizer_param_groups(model, config))

    generator = torch.Generator().manual_seed(args.seed)
    orders = {
        "shuffled": torch.randperm(len(data), generator=generator).tolist(),
        "grouped": list(LengthGroupedSampler(data, args.batch, seed=args.seed)),  # as vlmkit train does
    }
    batches = {k: [o[i : i + args.batch] for i in range(0, len(o), args.batch)] for k, o in orders.items()}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step(indices) -> tuple[float, float, int, int]:
        batch = collator([data[i] for i in indices])

        def train() -> None:
            with autocast:
                loss = model(**batch)["loss"]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        wall, cpu = harness.timed(train)
        return cpu, wall, int(batch["attention_mask"].sum()), batch["attention_mask"].numel()

    step(batches["shuffled"][0])  # warm-up
    totals = {k: [0.0, 0.0, 0, 0] for k in batches}
    per_step = {k: [] for k in batches}
    print(
        f"{args.examples} captions of {low}-{high} words, batch {args.batch}, {args.precision}; "
        f"{harness.describe_machine()}; {len(batches['grouped'])} steps each"
    )
    for i in range(len(batches["grouped"])):
        pair = ("grouped", "shuffled") if i % 2 == 0 else ("shuffled", "grouped")
        for key in pair:
            result = step(batches[key][i])
            per_step[key].append(result[0])
            for j, value in enumerate(result):
                totals[key][j] += value
        if (i + 1) % 10 == 0:
            print(f"  {i + 1} steps each", flush=True)

    print(
        f"\n{'batches':10} {'epoch CPU s':>12} {'epoch wall s':>13} {'samples/s':>10} {'padding':>8} {'tokens/step':>12}"
    )
    for key, (cpu, wall, real, padded) in totals.items():
        steps = len(batches[key])
        figures = {
            "epoch_cpu_s": cpu,
            "epoch_wall_s": wall,
            "samples_per_s_cpu": args.examples / cpu,
            "padding": 1 - real / padded,
            "tokens_per_step": padded / steps,
            "median_step_cpu_s": statistics.median(per_step[key]),
        }
        out.row(key, **figures)
        print(
            f"{key:10} {cpu:12.1f} {wall:13.1f} {figures['samples_per_s_cpu']:10.2f} "
            f"{figures['padding']:8.1%} {figures['tokens_per_step']:12.0f}"
        )
    shuffled, grouped = totals["shuffled"], totals["grouped"]
    ratio = {"cpu": shuffled[0] / grouped[0], "wall": shuffled[1] / grouped[1]}
    out.row("grouped vs shuffled", **ratio)
    print(
        f"\ngrouped vs shuffled: {ratio['cpu']:.2f}x faster per epoch (CPU time), {ratio['wall']:.2f}x (wall); "
        f"median step {statistics.median(per_step['grouped']):.2f} vs {statistics.median(per_step['shuffled']):.2f} s CPU"
    )
    return out.finish(["shuffled", "grouped", "grouped vs shuffled"])


if __name__ == "__main__":
    sys.exit(main())
