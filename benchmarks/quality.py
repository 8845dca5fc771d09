"""Caption quality against compute: which recipe captions *unseen compositions* best per CPU second.

Every recipe trains on the same ``scenes`` training images (same seed, same order of batches),
from cached features of the real EfficientNet-Lite0, into the real SmolLM2-135M with LoRA, for the
same budget: ``--budget`` CPU seconds of this process (steadier than the wall clock on a shared
machine) or ``--steps`` optimizer steps. The learning-rate schedule (linear warmup, cosine decay)
runs on the fraction of the budget spent, so every recipe gets a whole schedule. It is then scored
greedily on both test sets of ``scenes``: ``heldout`` (scenes holding colour-shape pairs never
seen in training) and ``seen`` (in-distribution):

- exact match (any reference phrasing), CIDEr-D (pycocoevalcap; IDF from the scored set),
- object F1: the (size, colour, shape) objects the caption names against the reference's,
  parsed with the ``scenes`` grammar (a caption outside it names no objects),
- colour-swap rate (held-out set): captions naming the right shapes and sizes but a wrong colour,
- samples/s of training, and the training time at which held-out exact match first reached 90%
  of its final value (from evaluations at 25/50/75/100% of the budget).

    python benchmarks/quality.py --quick                    # ~10 min: default vs lastmap, 400 CPU-s
    python benchmarks/quality.py                            # every recipe, 240 CPU-s each (~60 min)
    python benchmarks/quality.py --only default,lastmap --budget 600
    python benchmarks/quality.py --steps 150 --only default

The loop is the model's own ``forward`` (caption-only loss) with vlmkit's optimizer groups, not
``Trainer``: the same for every recipe, and it can stop on a CPU-time budget.

Each run's record goes to ``--out`` (``benchmarks/results/quality-*.json``, QUALITY.md's tables);
``--json PATH`` writes one JSON line per recipe as it finishes. ``--smoke``: the ``default`` and
``xattn`` recipes (the latter through ``benchmarks/cross_attention.py``) on tiny random models of
the same architectures, 2 steps, 40 scenes, scored on 4: checks the script, its figures mean
nothing (its record goes to a temporary folder unless ``--out`` is given).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import harness
from harness import ROOT

#: what every recipe starts from: the embedded default as the demo uses it (stage-4 features since
#: the third session; results before it call the last-map recipe ``default``)
BASE: dict[str, Any] = {
    "model": {
        "encoder_options": {"features": [4]},
        "format": "plain",
        "projection": {"type": "mlp", "reduction": "avgpool", "tokens": 16},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
    },
    "lr_projection": 2e-3,
    "lr_lora": 5e-4,
    "batch_size": 16,
    "warmup_ratio": 0.05,
}
ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

#: recipe name -> (what it changes against BASE, one-line description)
RECIPES: dict[str, tuple[dict[str, Any], str]] = {
    "default": ({}, "stage 4 (320 ch, 7x7) -> avgpool 16 tokens, MLP, plain, LoRA r16 q,k,v,o"),
    "lastmap": (
        {"model": {"encoder_options": {"features": None}}},
        "the last map (1280 ch, 7x7, after the head conv): the default before the third session",
    ),
    "tokens49": ({"model": {"projection": {"reduction": "none", "tokens": None}}}, "no pooling: 49 tokens"),
    "tokens4": ({"model": {"projection": {"tokens": 4}}}, "avgpool to 4 tokens"),
    "tokens9": ({"model": {"projection": {"tokens": 9}}}, "avgpool to 3x3 = 9 tokens: the scenes' grid"),
    "pixshuffle": (
        {"model": {"projection": {"reduction": "pixel_shuffle", "tokens": None, "factor": 2}}},
        "pixel-shuffle 2x2: 16 tokens of 4x1280",
    ),
    "linear": ({"model": {"projection": {"type": "linear"}}}, "linear projection"),
    "chat": ({"model": {"format": "chat"}}, "SmolLM2 chat layout"),
    "r8": ({"model": {"lora": {"r": 8, "alpha": 16}}}, "LoRA r8"),
    "r64": ({"model": {"lora": {"r": 64, "alpha": 128}}}, "LoRA r64"),
    "attn_mlp": ({"model": {"lora": {"targets": ATTN_MLP}}}, "LoRA on attention + MLP"),
    "colour9": (
        {"model": {"encoder_options": {"colour_bins": 5}, "projection": {"tokens": 9}}},
        "tokens9 + a 5x5x5-bin RGB histogram of each token's pixels beside stage 4 (320 + 125 ch)",
    ),
    "colour9w16": (
        {
            "model": {
                "encoder_options": {"colour_bins": 5, "colour_weight": 16.0},
                "projection": {"tokens": 9},
            }
        },
        "colour9 with the histogram times 16: per channel as strong as stage 4's after the LayerNorm",
    ),
    "grey_colour9": (
        {"model": {"encoder_options": {"colour_bins": 5, "greyscale": True}, "projection": {"tokens": 9}}},
        "colour9 with stage 4 of the image in grey: shape from the backbone, colour only from the histogram",
    ),
    "stages24": (
        {"model": {"encoder_options": {"features": [2, 4]}}},
        "encoder stages 2+4 (40+320 ch) pooled to 7x7, avgpool 16",
    ),
    "stages2last": (
        {"model": {"encoder_options": {"features": [2, -1]}}},
        "encoder stage 2 + last map (40+1280 ch), avgpool 16",
    ),
    "stages24_49": (
        {
            "model": {
                "encoder_options": {"features": [2, 4]},
                "projection": {"reduction": "none", "tokens": None},
            }
        },
        "encoder stages 2+4, all 49 tokens",
    ),
    "stages24_linear": (
        {"model": {"encoder_options": {"features": [2, 4]}, "projection": {"type": "linear"}}},
        "encoder stages 2+4, avgpool 16, linear projection",
    ),
    "stage2": (
        {"model": {"encoder_options": {"features": [2]}}},
        "encoder stage 2 only (40 ch, stride 8) pooled to 4x4 = 16 tokens",
    ),
    "lr_high": ({"lr_projection": 4e-3, "lr_lora": 1e-3}, "learning rates x2"),
    "xattn": (
        {"conditioning": "cross_attention"},
        "the default's 16 tokens through cross-attention in every decoder layer, no prefix",
    ),
    "xattn_ungated": (
        {"conditioning": "cross_attention_ungated"},
        "as xattn, without the gates (VisionEncoderDecoder's way: the LM perturbed from step 0)",
    ),
}
#: --quick: the default against the last map (the choice QUALITY.md's defaults rest on), single-object
#: scenes, 400 CPU-s each (~60 steps at two threads): about 10 minutes on an idle 2-core machine
QUICK = ("default", "lastmap")


#: --smoke: the default and the recipe that goes through benchmarks/cross_attention.py
SMOKE = ("default", "xattn")


def parse_args(argv=None) -> argparse.Namespace:
    p = harness.parser(__doc__, threads=2, epilog="--threads 1 on a machine shared with other jobs")
    p.add_argument("--quick", action="store_true", help="default vs lastmap, single objects, ~10 min")
    p.add_argument("--only", help=f"comma list of recipes: {', '.join(RECIPES)}")
    p.add_argument("--budget", type=float, help="CPU seconds of training per recipe (default 240; quick 400)")
    p.add_argument("--steps", type=int, help="train every recipe this many steps instead of a time budget")
    p.add_argument("--eval-samples", type=int, help="images per test set (default 100; quick 40)")
    p.add_argument("--train-size", type=int, help="scenes in the seen stream (default 3000; quick 1000)")
    p.add_argument("--scenes", help='JSON of extra scenes options (quick: \'{"kinds": ["single"]}\')')
    p.add_argument(
        "--evals", help="fractions of the budget at which to score (default 0.25,0.5,0.75,1; quick 0.5,1)"
    )
    p.add_argument("--set", action="append", default=[], help="override for every recipe: key=json")
    p.add_argument("--out", default=None, help="folder for the run's record (default: benchmarks/results)")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.eval_samples, args.train_size, args.evals = 2, 4, 40, "1"
        args.scenes = args.scenes or '{"kinds": ["single"]}'
        args.out = args.out or str(harness.workdir("quality"))
        args.only = args.only or ",".join(SMOKE)
    args.out = args.out or str(ROOT / "benchmarks" / "results")
    args.budget = args.budget or (400 if args.quick else 240)
    args.eval_samples = args.eval_samples or (40 if args.quick else 100)
    args.scenes = args.scenes or ('{"kinds": ["single"]}' if args.quick else "{}")
    args.train_size = args.train_size or (1000 if args.quick else 3000)
    args.evals = args.evals or ("0.5,1" if args.quick else "0.25,0.5,0.75,1")
    names = args.only.split(",") if args.only else list(QUICK if args.quick else RECIPES)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        p.error(f"unknown recipes {unknown}; choose from {', '.join(RECIPES)}")
    args.names = names
    args.evals = [float(x) for x in args.evals.split(",")]
    return args


def merge(base: dict, change: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


# ----------------------------------------------------------------------------------- scoring


def objects_of(caption: str) -> Counter:
    from vlmkit.plugins.datasets.scenes import parse_caption

    try:
        return Counter(tuple(o) for o in parse_caption(caption)["objects"])
    except ValueError:
        return Counter()


def score(rows: list[dict[str, Any]]) -> dict[str, float]:
    from vlmkit.evaluate.metrics import exact_match, score_captions
    from vlmkit.plugins.datasets.scenes import colour_swap

    preds = {r["id"]: r["prediction"] for r in rows}
    refs = {r["id"]: r["references"] for r in rows}
    out = {"exact": exact_match(preds, refs)}
    try:
        out["cider"] = float(score_captions(preds, refs, metrics=["CIDEr"])["CIDEr"])
    except Exception as exc:  # noqa: BLE001 - a metric failing must not lose the run
        print(f"CIDEr failed: {exc}", file=sys.stderr)
    f1s, swaps = [], 0
    for r in rows:
        pred, ref = objects_of(r["prediction"]), objects_of(r["references"][0])
        hit = sum((pred & ref).values())
        f1s.append(2 * hit / (sum(pred.values()) + sum(ref.values())) if pred or ref else 1.0)
        swaps += colour_swap(r["prediction"], r["references"][0])
    out["object_f1"] = sum(f1s) / len(f1s)
    out["colour_swap"] = swaps / len(rows)
    return out


def caption_features(model, feats, data, limit: int, batch: int = 48) -> list[dict[str, Any]]:
    import torch

    rows = []
    limit = min(limit, len(data))
    for start in range(0, limit, batch):
        idx = list(range(start, min(limit, start + batch)))
        x = torch.from_numpy(feats[idx].astype("float32"))
        for i, text in zip(idx, model.generate(features=x, max_new_tokens=40), strict=True):
            rows.append({"id": data[i].id, "prediction": text, "references": list(data[i].captions)})
    return rows


# ----------------------------------------------------------------------------------- training


def lr_factor(fraction: float, warmup: float) -> float:
    if fraction < warmup:
        return (fraction + 1e-3) / warmup
    progress = min(1.0, (fraction - warmup) / (1 - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress))


def run_recipe(name: str, settings: dict[str, Any], args, registry, datasets, log) -> dict[str, Any]:
    import torch

    from vlmkit.core.config import ModelConfig
    from vlmkit.core.model import PrefixConditioningVLM
    from vlmkit.train.features import FeatureCache
    from vlmkit.train.trainer import make_optimizer

    model_config = ModelConfig.model_validate(
        harness.model_config(args.smoke, args.work, **settings["model"])
    )
    model = PrefixConditioningVLM.build(model_config, registry=registry, seed=args.seed)
    cache = FeatureCache()
    feats = {k: cache.features_for(model.encoder, d, progress=False) for k, d in datasets.items()}
    groups = model.trainable_parameter_groups()
    if settings.get("conditioning") in ("cross_attention", "cross_attention_ungated"):
        from benchmarks.cross_attention import attach  # new layers: the projection's rate

        groups["projection"] += attach(model, gated=settings["conditioning"] == "cross_attention")
    lrs = {"projection": settings["lr_projection"], "lora": settings["lr_lora"]}
    param_groups = [{"params": groups[k], "lr": lrs[k], "weight_decay": 0.0} for k in lrs if groups[k]]
    optimizer = make_optimizer(param_groups)
    base_lrs = [g["lr"] for g in param_groups]
    train, train_feats = datasets["train"], feats["train"]
    rng = random.Random(args.seed)
    order: list[int] = []
    checkpoints = list(args.evals)
    evals, step, cpu_used, wall_used, samples = [], 0, 0.0, 0.0, 0
    bs = settings["batch_size"]
    last_loss = float("nan")
    while True:
        fraction = step / args.steps if args.steps else cpu_used / args.budget
        if checkpoints and fraction >= checkpoints[0] - 1e-9:
            mark = checkpoints.pop(0)
            scores = {
                k: score(caption_features(model, feats[k], datasets[k], args.eval_samples))
                for k in ("heldout", "seen")
            }
            evals.append(
                {
                    "at": mark,
                    "step": step,
                    "cpu_s": round(cpu_used, 1),
                    "wall_s": round(wall_used, 1),
                    **{f"{k}_{m}": round(v, 4) for k, s in scores.items() for m, v in s.items()},
                }
            )
            log(
                f"  {name} {mark:>4.0%} step {step:4d} loss {last_loss:.3f} | held-out exact "
                f"{scores['heldout']['exact']:.1%} f1 {scores['heldout']['object_f1']:.2f} | seen exact "
                f"{scores['seen']['exact']:.1%} | {cpu_used:.0f} cpu-s {wall_used:.0f} s"
            )
            if not checkpoints:
                break
            continue
        model.train()
        t_wall, t_cpu = time.perf_counter(), time.process_time()
        for g, lr in zip(param_groups, base_lrs, strict=True):
            g["lr"] = lr * lr_factor(fraction, settings["warmup_ratio"])
        if len(order) < bs:
            more = list(range(len(train)))
            rng.shuffle(more)
            order += more
        idx, order = order[:bs], order[bs:]
        captions = [rng.choice(train[i].captions) for i in idx]
        batch = model.tokenize(captions).to_dict()
        batch["features"] = torch.from_numpy(train_feats[idx].astype("float32"))
        loss = model(**batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in param_groups for p in g["params"]], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        last_loss = loss.item()
        step, samples = step + 1, samples + bs
        cpu_used += time.process_time() - t_cpu
        wall_used += time.perf_counter() - t_wall
        if step % 20 == 0:
            log(
                f"  {name} step {step} loss {last_loss:.3f} ({cpu_used:.0f} cpu-s, {samples / wall_used:.1f} samples/s)"
            )
    final = evals[-1]
    key = "heldout_exact" if final["heldout_exact"] > 0 else "seen_exact"
    reached = next((e for e in evals if e[key] >= 0.9 * final[key]), final)
    examples = caption_features(model, feats["heldout"], datasets["heldout"], 4)
    return {
        "recipe": name,
        "description": RECIPES[name][1],
        "settings": settings,
        "prefix_tokens": model.num_prefix_tokens,
        "feature_dim": model.encoder.feature_dim,
        "steps": step,
        "samples": samples,
        "train_cpu_s": round(cpu_used, 1),
        "train_wall_s": round(wall_used, 1),
        "samples_per_s": round(samples / wall_used, 2),
        "time_to_90pct_wall_s": reached["wall_s"],
        "final": final,
        "evals": evals,
        "examples": examples,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    report = harness.start(args, "quality")
    args.work = harness.workdir("quality-models")  # --smoke's tiny checkpoints
    load_before = os.getloadavg()[0]
    from vlmkit.core.registry import get_registry
    from vlmkit.plugins.datasets import scenes

    registry = get_registry()
    if "scenes" not in registry.names("dataset"):  # an install that predates the entry point
        registry.add_plugin(scenes, name="scenes")
    spec = registry.dataset("scenes")
    options = {"size": args.train_size, "heldout_size": max(args.eval_samples, 4), **json.loads(args.scenes)}
    datasets = {
        "train": spec.load("train", options, seed=args.seed),
        "heldout": spec.load("test", options, seed=args.seed),
        "seen": spec.load("test", {**options, "test": "seen"}, seed=args.seed),
    }
    info = harness.machine()
    budget = f"{args.steps} steps" if args.steps else f"{args.budget:.0f} CPU-s"
    print(
        f"quality: {len(args.names)} recipes x {budget}; train {len(datasets['train'])} scenes, test "
        f"{args.eval_samples} held-out + {args.eval_samples} seen; {info['cpu']}, {args.threads} threads",
        file=sys.stderr,
    )
    overrides = {}
    for item in args.set:
        key, value = item.split("=", 1)
        node = overrides
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = json.loads(value)
    results = []
    started = time.perf_counter()
    for i, name in enumerate(args.names, 1):
        print(f"[{i}/{len(args.names)}] {name}: {RECIPES[name][1]}", file=sys.stderr)
        settings = merge(merge(BASE, RECIPES[name][0]), overrides)
        result = run_recipe(name, settings, args, registry, datasets, lambda m: print(m, file=sys.stderr))
        results.append(result)
        report.row(name, **result)
    record = {
        "command": " ".join(["python benchmarks/quality.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {**info, "load_before": load_before, "load_after": os.getloadavg()[0]},
        "budget": budget,
        "scenes_options": options,
        "total_wall_s": round(time.perf_counter() - started, 1),
        "results": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"quality-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(table(record))
    print(f"\nwrote {path}", file=sys.stderr)
    return report.finish(args.names)


def table(record: dict[str, Any]) -> str:
    head = (
        "| recipe | tokens | steps | samples/s | held-out exact | held-out CIDEr | held-out obj F1 | colour swaps "
        "| seen exact | seen CIDEr | to 90% (s) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in record["results"]:
        f = r["final"]
        lines.append(
            f"| {r['recipe']} | {r['prefix_tokens']} | {r['steps']} | {r['samples_per_s']} | "
            f"{f['heldout_exact']:.1%} | {f.get('heldout_cider', float('nan')):.2f} | {f['heldout_object_f1']:.2f} | "
            f"{f['heldout_colour_swap']:.1%} | {f['seen_exact']:.1%} | {f.get('seen_cider', float('nan')):.2f} | "
            f"{r['time_to_90pct_wall_s']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
