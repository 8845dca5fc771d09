"""``vlmkit eval``: caption a split and score it against every reference caption."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmkit.core.errors import ConfigError


@dataclass
class EvalResult:
    metrics: dict[str, float]
    predictions: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    out_dir: Path | None = None


def generate_captions(
    model,
    data,
    *,
    batch_size: int = 32,
    limit: int | None = None,
    on_batch: Callable[[int], None] | None = None,
    **generate_kwargs,
) -> list[dict[str, Any]]:
    """Greedy (or as configured) captions for the first ``limit`` examples of ``data``.

    Images are decoded in a background thread while the model generates for the previous batch.
    """
    from concurrent.futures import ThreadPoolExecutor

    n = min(len(data), limit) if limit else len(data)
    batches = [list(range(s, min(n, s + batch_size))) for s in range(0, n, batch_size)]

    def load(indices):
        examples = [data[i] for i in indices]
        return examples, [ex.load_image() for ex in examples]

    rows: list[dict[str, Any]] = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, batches[0]) if batches else None
        for b in range(len(batches)):
            examples, images = pending.result()
            if b + 1 < len(batches):
                pending = pool.submit(load, batches[b + 1])
            captions = model.generate(images, **generate_kwargs)
            for ex, text in zip(examples, captions, strict=True):
                rows.append({"id": ex.id, "prediction": text, "references": list(ex.captions)})
            if on_batch:
                on_batch(len(examples))
    return rows


def score(rows: list[dict[str, Any]]) -> dict[str, float]:
    from vlmkit.core.metrics import exact_match, score_captions

    predictions = {r["id"]: r["prediction"] for r in rows}
    references = {r["id"]: r["references"] for r in rows}
    metrics = score_captions(predictions, references)
    metrics["exact_match"] = exact_match(predictions, references)
    return metrics


def evaluate(
    model,
    data,
    *,
    out_dir: str | Path | None = None,
    batch_size: int = 32,
    limit: int | None = None,
    on_batch: Callable[[int], None] | None = None,
    extra: dict[str, Any] | None = None,
    **generate_kwargs,
) -> EvalResult:
    """Caption ``data`` with ``model``, score it, and (with ``out_dir``) write
    ``predictions.jsonl`` and ``metrics.json`` there."""
    if len(data) == 0:
        raise ConfigError("the evaluation split is empty; nothing to evaluate")
    started = time.perf_counter()
    rows = generate_captions(
        model, data, batch_size=batch_size, limit=limit, on_batch=on_batch, **generate_kwargs
    )
    metrics = score(rows)
    seconds = time.perf_counter() - started
    out = None
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with (out / "predictions.jsonl").open("w") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
        described = metrics.describe() if hasattr(metrics, "describe") else {"metrics": dict(metrics)}
        record = {**described, "count": len(rows), "seconds": round(seconds, 2), **(extra or {})}
        (out / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
    return EvalResult(metrics=metrics, predictions=rows, seconds=seconds, out_dir=out)
