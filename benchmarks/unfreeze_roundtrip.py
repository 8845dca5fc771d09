"""Issue 19's reproduction: the demo recipe with ``unfreeze_encoder_layers: 2`` (EfficientNet-Lite0,
batch norm in every block) on ``shapes``, real weights, 100 steps of 16. Prints the exact match of
the model as training left it in memory and of the same model saved and loaded again: before the
fix the loaded one fell to 38% (running statistics moved in frozen blocks and were never saved).

    python benchmarks/unfreeze_roundtrip.py runs/unfreeze

The encoder runs every step (an unfrozen encoder cannot use the feature cache): about 10 minutes on
a quiet 2-core CPU.
"""

from __future__ import annotations

import sys
import time

import torch
from transformers import TrainerCallback

import vlmkit
from vlmkit.evaluate.loop import evaluate
from vlmkit.recipes.demo import demo_config
from vlmkit.sdk.datasets import load_split
from vlmkit.train import train


class KeepModel(TrainerCallback):
    """Holds on to the trained model object as training ends."""

    model = None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        KeepModel.model = model


def main(out: str) -> None:
    torch.set_num_threads(2)
    model = {**demo_config(out).model.model_dump(), "unfreeze_encoder_layers": 2}
    config = demo_config(out, model=model)
    started = time.perf_counter()
    result = train(config, overwrite=True, progress=False, callbacks=[KeepModel()])
    print(f"trained {result.global_step} steps in {time.perf_counter() - started:.0f} s", flush=True)
    test = load_split(config.datasets, "test", seed=config.seed)
    in_memory = evaluate(KeepModel.model, test).metrics
    loaded = evaluate(vlmkit.load(out), test).metrics
    print(
        f"in-memory: exact {in_memory['exact_match']:.3f} CIDEr {in_memory['CIDEr']:.2f}; "
        f"loaded: exact {loaded['exact_match']:.3f} CIDEr {loaded['CIDEr']:.2f}; n={len(test)}"
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/unfreeze")
