"""One epoch with length-grouped batches (``vlmkit train --group-by-length``) vs shuffled ones.

Captions of mixed length pad every batch to its longest caption. With ``--group-by-length``,
``vlmkit train`` batches similar lengths together (``vlmkit.train.trainer.LengthGroupedSampler``:
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
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

# fmt: off
WORDS = (
    "a", "the", "photo", "of", "man", "woman", "child", "dog", "cat", "red", "blue", "green",
    "small", "large", "wooden", "table", "with", "on", "in", "near", "front", "sitting", "standing",
    "holding", "white", "black", "street", "park", "grass", "tree", "sky", "under", "next", "to",
    "two", "three", "people", "car", "bicycle", "bowl", "cup", "coffee", "plate", "food", "window",
    "light", "building", "old", "young",
)
# fmt: on


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=800)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--words", default="5-40", help="caption length range in words, e.g. 5-40")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    args = parser.parse_args()
    low, high = (int(x) for x in args.words.split("-"))

    import numpy as np
    import torch

    from vlmkit.core.contracts import CaptionExample
    from vlmkit.core.model import PrefixConditioningVLM
    from vlmkit.sdk.datasets import ListDataset
    from vlmkit.train.config import TrainConfig
    from vlmkit.train.data import CaptionTrainingSet, Collator, LengthGroupedSampler
    from vlmkit.train.trainer import make_optimizer, optimizer_param_groups, prepare_model_for_precision

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = random.Random(0)
    config = TrainConfig.model_validate(
        {
            "model": {
                "format": "plain",
                "projection": {"type": "mlp", "reduction": "avgpool", "tokens": 16},
            }
        }
    )
    model = PrefixConditioningVLM.build(config.model)
    prepare_model_for_precision(model, args.precision, "cpu")
    model.train()
    examples = [
        CaptionExample(
            id=str(i),
            captions=[" ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."],
            image=None,
        )
        for i in range(args.examples)
    ]
    shape = (args.examples, model.encoder.num_tokens, model.encoder.feature_dim)
    features = np.random.default_rng(0).standard_normal(shape, dtype=np.float32).astype(np.float16)
    data = CaptionTrainingSet(ListDataset(examples, "synthetic"), features=features)
    collator = Collator(model)
    optimizer = make_optimizer(optimizer_param_groups(model, config))

    generator = torch.Generator().manual_seed(0)
    orders = {
        "shuffled": torch.randperm(len(data), generator=generator).tolist(),
        "grouped": list(LengthGroupedSampler(data, args.batch, seed=0)),  # as vlmkit train does
    }
    batches = {k: [o[i : i + args.batch] for i in range(0, len(o), args.batch)] for k, o in orders.items()}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step(indices) -> tuple[float, float, int, int]:
        batch = collator([data[i] for i in indices])
        real = int(batch["attention_mask"].sum())
        padded = batch["attention_mask"].numel()
        cpu, wall = time.process_time(), time.perf_counter()
        with autocast:
            loss = model(**batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.process_time() - cpu, time.perf_counter() - wall, real, padded

    step(batches["shuffled"][0])  # warm-up
    totals = {k: [0.0, 0.0, 0, 0] for k in batches}
    per_step = {k: [] for k in batches}
    print(
        f"{args.examples} captions of {low}-{high} words, batch {args.batch}, {args.precision}, "
        f"{args.threads} thread(s), load {os.getloadavg()[0]:.1f}; {len(batches['grouped'])} steps each"
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
        print(
            f"{key:10} {cpu:12.1f} {wall:13.1f} {args.examples / cpu:10.2f} "
            f"{1 - real / padded:8.1%} {padded / steps:12.0f}"
        )
    shuffled, grouped = totals["shuffled"], totals["grouped"]
    print(
        f"\ngrouped vs shuffled: {shuffled[0] / grouped[0]:.2f}x faster per epoch (CPU time), "
        f"{shuffled[1] / grouped[1]:.2f}x (wall); median step {statistics.median(per_step['grouped']):.2f} "
        f"vs {statistics.median(per_step['shuffled']):.2f} s CPU"
    )


if __name__ == "__main__":
    main()
