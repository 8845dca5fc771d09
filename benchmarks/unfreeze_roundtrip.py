"""Issue 19's reproduction: the demo recipe with ``unfreeze_encoder_layers: 2`` (EfficientNet-Lite0,
batch norm in every block) on the demo's dataset, real weights, 100 steps of 16. Prints the exact
match of the model as training left it in memory and of the same model saved and loaded again:
before the fix the loaded one fell to 38% (running statistics moved in frozen blocks and were
never saved).

    python benchmarks/unfreeze_roundtrip.py runs/unfreeze

The encoder runs every step (an unfrozen encoder cannot use the feature cache): about 10 minutes on
a quiet 2-core CPU.

``--smoke``: timm's tiny test EfficientNet (batch norm too) and a 2-layer Llama, one block
unfrozen, 2 steps of 4 on 40 scenes, scored on 8: checks the script (and that the two scores are
produced), its figures mean nothing; the run goes to a temporary folder unless OUT is given.
``--json PATH``: one JSON line each for the in-memory and the loaded model.
"""

from __future__ import annotations

import sys
import time

import harness


def scores(model, data) -> dict[str, float]:
    """Exact match and CIDEr of ``model``'s greedy captions of ``data`` (what ``vlmkit eval``
    reports for them; the other metrics, METEOR's Java start-up among them, are not computed)."""
    from vlmkit.evaluate.loop import generate_captions
    from vlmkit.evaluate.metrics import exact_match, score_captions

    rows = generate_captions(model, data)
    predictions = {r["id"]: r["prediction"] for r in rows}
    references = {r["id"]: r["references"] for r in rows}
    cider = score_captions(predictions, references, metrics=["CIDEr"])["CIDEr"]
    return {"exact_match": exact_match(predictions, references), "CIDEr": float(cider)}


def main(argv=None) -> int:
    parser = harness.parser(__doc__, threads=2)
    parser.add_argument("out", nargs="?", default=None, help="the run's folder (default: runs/unfreeze)")
    args = parser.parse_args(argv)
    out = args.out or str(harness.workdir("unfreeze") / "run" if args.smoke else "runs/unfreeze")
    report = harness.start(args, "unfreeze_roundtrip")

    from transformers import TrainerCallback

    import vlmkit
    from vlmkit.recipes.demo import demo_config
    from vlmkit.sdk.datasets import load_split
    from vlmkit.train import train

    class KeepModel(TrainerCallback):
        """Holds on to the trained model object as training ends."""

        model = None

        def on_train_end(self, args, state, control, model=None, **kwargs):
            KeepModel.model = model

    model = {**demo_config(out).model.model_dump(), "unfreeze_encoder_layers": 2}
    overrides = {"precision": "fp32", "seed": args.seed}  # fp32 as in RESULTS.md (a CPU without bf16)
    if args.smoke:
        model |= {
            **harness.tiny_model_config(harness.workdir("unfreeze-models")),
            "unfreeze_encoder_layers": 1,
        }
        scenes = {"size": 40, "heldout_size": 8, "kinds": ["single"], "image_size": 64}
        overrides |= {"datasets": [{"name": "scenes", "options": scenes}], "max_steps": 2, "batch_size": 4}
    config = demo_config(out, model=model, **overrides)
    started = time.perf_counter()
    result = train(config, overwrite=True, progress=False, callbacks=[KeepModel()])
    seconds = time.perf_counter() - started
    print(f"trained {result.global_step} steps in {seconds:.0f} s; {harness.describe_machine()}", flush=True)
    test = load_split(config.datasets, "test", seed=config.seed)
    in_memory = scores(KeepModel.model, test)
    loaded = scores(vlmkit.load(out), test)
    for name, metrics in (("in memory", in_memory), ("saved and loaded", loaded)):
        report.row(
            name, exact_match=metrics["exact_match"], cider=metrics["CIDEr"], n=len(test), train_s=seconds
        )
    print(
        f"in-memory: exact {in_memory['exact_match']:.3f} CIDEr {in_memory['CIDEr']:.2f}; "
        f"loaded: exact {loaded['exact_match']:.3f} CIDEr {loaded['CIDEr']:.2f}; n={len(test)}"
    )
    return report.finish(["in memory", "saved and loaded"])


if __name__ == "__main__":
    sys.exit(main())
