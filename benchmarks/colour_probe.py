"""Is colour readable for *unseen* colour-shape pairs from the features the prefix is made of?

A linear probe per feature source of EfficientNet-Lite0 (the embedded default's encoder): the
features of single-object ``scenes`` are averaged over their tokens (the background is a flat
grey, so the mean is the object's), a multinomial logistic regression learns the object's colour
(and, separately, its shape) on the training scenes, and is scored on the held-out scenes, whose
colour-shape pairs never occur in training, and on in-distribution test scenes. A source whose
colour probe fails on held-out pairs has fused colour with shape: a caption model reading it names
the colour it saw with that shape (benchmarks/QUALITY.md, "colour swaps").

    python benchmarks/colour_probe.py                       # last map, stage 2, stage 3, stage 4, 2+last
    python benchmarks/colour_probe.py --sources=-1 --sources=2

Features come from vlmkit's feature cache (the ones ``benchmarks/quality.py`` uses are reused).

``--smoke``: timm's tiny test EfficientNet (random weights, 128 px) instead of EfficientNet-Lite0,
sources ``last`` and ``stage2``, 40 seen and 12 held-out scenes: checks the script, its figures
mean nothing. ``--json PATH``: one JSON line per feature source.
"""

from __future__ import annotations

import os
import time

import harness

SOURCES = {"last": [-1], "stage2": [2], "stage3": [3], "stage4": [4], "stage2+last": [2, -1]}
#: sources with more encoder options than stages (``colour_bins``, ``greyscale``): name -> (options,
#: the feature columns probed: all, or only the colour histogram's 125)
OPTION_SOURCES = {
    "stage4+colour": ({"features": [4], "colour_bins": 5}, None),
    "grey4": ({"features": [4], "greyscale": True}, None),
    "grey4+colour": ({"features": [4], "colour_bins": 5, "greyscale": True}, None),
    "colour": ({"features": [4], "colour_bins": 5}, slice(-125, None)),
}


def probe(train_x, train_y, tests: dict, classes: int, steps: int = 300) -> dict[str, float]:
    """Predicted classes of a multinomial logistic regression (standardised inputs, L2, L-BFGS)
    trained on ``train_x, train_y``, per test set of ``tests`` (name -> (x, y))."""
    import torch

    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    norm = lambda x: (x - mean) / std  # noqa: E731
    layer = torch.nn.Linear(train_x.shape[1], classes)
    optimizer = torch.optim.LBFGS(layer.parameters(), max_iter=steps, line_search_fn="strong_wolfe")
    x = norm(train_x)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(layer(x), train_y) + 1e-3 * layer.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return {k: layer(norm(tx)).argmax(1) for k, (tx, _) in tests.items()}


def _pair_summary(said: list[str], truth: str) -> str:
    from collections import Counter

    wrong = Counter(w for w in said if w != truth).most_common(1)
    right = sum(w == truth for w in said) / len(said)
    return f"{right:.0%}" + (f" (else {wrong[0][0]})" if wrong else "")


def main(argv=None) -> int:
    p = harness.parser(__doc__, threads=2)
    p.add_argument(
        "--sources",
        action="append",
        help=f"feature source: {', '.join([*SOURCES, *OPTION_SOURCES])}, or stages as 1+4 (repeatable)",
    )
    p.add_argument("--train-size", type=int, default=1000, help="seen scenes (train + validation + test)")
    p.add_argument("--heldout-size", type=int, default=200)
    args = p.parse_args(argv)
    if args.smoke:
        args.sources, args.train_size, args.heldout_size = args.sources or ["last", "stage2"], 40, 12
    out = harness.start(args, "colour_probe")
    import numpy as np
    import torch

    from vlmkit.core.registry import get_registry
    from vlmkit.plugins.datasets.scenes import parse_caption
    from vlmkit.train.features import FeatureCache

    registry = get_registry()
    checkpoint = harness.model_config(args.smoke, harness.workdir("colour-probe"))["encoder_checkpoint"]
    spec = registry.dataset("scenes")
    options = {"size": args.train_size, "heldout_size": args.heldout_size, "kinds": ["single"]}
    data = {
        "train": spec.load("train", options),
        "heldout": spec.load("test", options),
        "seen": spec.load("test", {**options, "test": "seen"}),
    }
    labels = {}
    for split, ds in data.items():
        objects = [parse_caption(ds[i].captions[0])["objects"][0] for i in range(len(ds))]
        labels[split] = {"colour": [o[1] for o in objects], "shape": [o[2] for o in objects]}
    vocab = {k: sorted(set(labels["train"][k]) | set(labels["heldout"][k])) for k in ("colour", "shape")}
    names = args.sources or list(SOURCES)
    rows = []
    for name in names:
        if name in OPTION_SOURCES:
            settings, columns = OPTION_SOURCES[name]
        else:
            stages = SOURCES[name] if name in SOURCES else [int(s) for s in name.split("+")]
            settings, columns = ({} if stages == [-1] else {"features": stages}), None
        stages = settings.get("features", [-1])
        started = time.perf_counter()
        timm = registry.encoder("timm")
        options_ = {"options": timm.options.model_validate(settings)} if settings else {}
        encoder = timm.load(checkpoint, revision=None, **options_)
        cache = FeatureCache()
        feats = {
            k: torch.from_numpy(np.asarray(cache.features_for(encoder, d), dtype=np.float32).mean(1))
            for k, d in data.items()
        }
        if columns is not None:
            feats = {k: v[:, columns] for k, v in feats.items()}
        row = {"source": name, "stages": stages, "dim": int(feats["train"].shape[1])}
        for attr in ("colour", "shape"):
            index = {v: i for i, v in enumerate(vocab[attr])}
            y = {k: torch.tensor([index[v] for v in labels[k][attr]]) for k in data}
            tests = {k: (feats[k], y[k]) for k in ("heldout", "seen")}
            predicted = probe(feats["train"], y["train"], tests, len(vocab[attr]))
            row |= {f"{attr}_{k}": round(float((predicted[k] == y[k]).float().mean()), 3) for k in tests}
            if attr == "colour":  # per held-out pair: how often right, and the colour said instead
                pairs = [
                    f"{c} {s}"
                    for c, s in zip(labels["heldout"]["colour"], labels["heldout"]["shape"], strict=True)
                ]
                said = [vocab["colour"][i] for i in predicted["heldout"].tolist()]
                row["heldout_pairs"] = {
                    pair: _pair_summary(
                        [w for p_, w in zip(pairs, said, strict=True) if p_ == pair], pair.split()[0]
                    )
                    for pair in sorted(set(pairs))
                }
        row["seconds"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        out.row(name, **row)
    print(
        f"\ncolour/shape probes, single-object scenes: train {len(data['train'])}, held-out "
        f"{len(data['heldout'])}, seen test {len(data['seen'])}; load {os.getloadavg()[0]:.1f}; "
        f"{harness.describe_machine()}\n"
    )
    pairs = sorted(rows[0]["heldout_pairs"])
    print(
        "| features | dim | colour, held-out pairs | colour, seen | shape, held-out pairs | shape, seen | "
        + " | ".join(f"colour of {p}" for p in pairs)
        + " |"
    )
    print("|---|---:|---:|---:|---:|---:|" + "---|" * len(pairs))
    for r in rows:
        print(
            f"| {r['source']} {r['stages']} | {r['dim']} | {r['colour_heldout']:.1%} | {r['colour_seen']:.1%} "
            f"| {r['shape_heldout']:.1%} | {r['shape_seen']:.1%} | "
            + " | ".join(r["heldout_pairs"][p] for p in pairs)
            + " |"
        )
    return out.finish(names)


if __name__ == "__main__":
    raise SystemExit(main())
