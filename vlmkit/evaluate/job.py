"""The jobs of ``vlmkit eval`` (``run``) and ``vlmkit caption`` (``caption``): each takes its
configuration (``vlmkit.evaluate.config``) and returns what it computed; the CLI prints it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from vlmkit.core.config import DatasetConfig
from vlmkit.core.errors import ConfigError
from vlmkit.evaluate.config import CaptionConfig, EvalConfig
from vlmkit.evaluate.loop import CaptionResult, EvalResult, caption_files, evaluate

log = logging.getLogger(__name__)

#: ``on_batch(n, total)``: ``n`` more images captioned, of ``total``
OnBatch = Callable[[int, int], None]


def run(config: EvalConfig, *, on_batch: OnBatch | None = None) -> EvalResult:
    """Caption ``config.split`` of the datasets (by default those the model was trained on, split
    with its seed) and score it; writes predictions.jsonl and metrics.json."""
    from vlmkit.core.artifact import read_manifest
    from vlmkit.sdk.datasets import load_split

    trained = read_manifest(config.model).get("training", {}).get("config", {})
    datasets = config.datasets or [DatasetConfig.model_validate(d) for d in trained.get("datasets") or []]
    if not datasets:
        raise ConfigError(f"{config.model} records no training datasets; name one with --dataset")
    seed = trained.get("seed", 0) if config.seed is None else config.seed
    data = load_split(datasets, config.split, seed=seed)
    vlm = _load(config.model, config.device, config.precision)
    total = min(len(data), config.max_samples) if config.max_samples else len(data)
    return evaluate(
        vlm,
        data,
        out_dir=config.output or Path(config.model) / f"eval-{config.split}",
        batch_size=config.batch_size,
        limit=config.max_samples,
        on_batch=(lambda n: on_batch(n, total)) if on_batch else None,
        extra={
            "model": str(config.model),
            "split": config.split,
            "datasets": [d.model_dump() for d in datasets],
        },
        num_beams=config.num_beams,
        max_new_tokens=config.max_new_tokens,
    )


def caption(config: CaptionConfig, *, on_batch: OnBatch | None = None) -> list[CaptionResult]:
    """A caption (or the reason there is none) for each of ``config.images``, in order."""
    if config.onnx is not None:
        from vlmkit.runtime.onnx import OnnxCaptioner, execution_providers

        vlm = OnnxCaptioner(config.onnx, providers=execution_providers(config.provider or "cpu"))
    else:
        vlm = _load(config.model, config.device, config.precision)
    kwargs = {"prompt": config.prompt} if config.prompt is not None else {}
    total = len(config.images)
    return caption_files(
        vlm,
        config.images,
        batch_size=config.batch_size,
        on_batch=(lambda n: on_batch(n, total)) if on_batch else None,
        max_new_tokens=config.max_new_tokens,
        num_beams=config.num_beams,
        do_sample=config.sample,
        temperature=config.temperature,
        **kwargs,
    )


def _load(model: Path, device: str, precision: str):
    import vlmkit
    from vlmkit.core.placement import resolve

    placement = resolve(device, precision)
    log.info("%s", placement.describe())
    return vlmkit.load(model, device=placement.device, dtype=placement.precision)
