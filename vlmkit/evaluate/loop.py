"""The one caption-and-score loop: ``vlmkit eval``, training's ``--eval-metrics`` and the demo
caption a split with ``generate_captions`` and score it with ``score``; ``caption_files`` captions
image files (``vlmkit caption``)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmkit.core import ranks
from vlmkit.core.contracts import CaptionExample
from vlmkit.core.errors import ConfigError, DataError, printable
from vlmkit.core.paths import atomic_write, check_writable_folder, make_dirs, write_json


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
    features=None,
    batch_size: int = 32,
    limit: int | None = None,
    on_batch: Callable[[int], None] | None = None,
    rank: int = 0,
    world_size: int = 1,
    **generate_kwargs,
) -> list[dict[str, Any]]:
    """Greedy (or as configured) captions for the first ``limit`` examples of ``data``: one row
    ``{"id", "prediction", "references"}`` each. ``vlmkit eval`` and training's evaluation both
    caption through here.

    ``features`` (rows in ``data``'s order, e.g. the feature cache) stand in for the images.
    Otherwise images are decoded in a background thread while the model generates for the
    previous batch. With ``world_size > 1``, only rank ``rank``'s share: see ``rank_batches``.
    """
    from concurrent.futures import ThreadPoolExecutor

    n = min(len(data), limit) if limit else len(data)
    batches, count = rank_batches(n, batch_size, rank, world_size)

    def load(indices):
        examples = [data[i] for i in indices]
        if features is not None:
            import torch

            rows = features[indices[0] : indices[-1] + 1].astype("float32")
            return examples, {"features": torch.from_numpy(rows)}
        return examples, {"images": [ex.load_image() for ex in examples]}

    rows: list[dict[str, Any]] = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, batches[0]) if batches else None
        for b in range(len(batches)):
            examples, inputs = pending.result()
            if b + 1 < len(batches):
                pending = pool.submit(load, batches[b + 1])
            captions = model.generate(**inputs, **generate_kwargs)
            for ex, text in zip(examples, captions, strict=True):
                rows.append({"id": ex.id, "prediction": text, "references": list(ex.captions)})
            if on_batch:
                on_batch(len(examples))
    return rows[:count]


def rank_batches(n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> tuple[list[list[int]], int]:
    """Rank ``rank``'s contiguous share of examples ``0..n-1`` in batches, and the share's size.

    Contiguous, so the shares gathered in rank order are the examples in order and a batch of
    cached features is one slice of the memmap. Every rank gets the same number of batches: a
    sharded model (FSDP) needs all ranks in each forward, so a rank short of examples captions
    one example again (its rows beyond the share's size are dropped).
    """
    start, stop = n * rank // world_size, n * (rank + 1) // world_size
    batches = [list(range(s, min(stop, s + batch_size))) for s in range(start, stop, batch_size)]
    steps = math.ceil(math.ceil(n / world_size) / batch_size)
    batches += [[min(start, n - 1)]] * (steps - len(batches))
    return batches, stop - start


def caption_and_score(
    model, data, *, features=None, batch_size: int = 32, limit: int | None = None, **generate_kwargs
) -> dict[str, float]:
    """Training's ``--eval-metrics``: caption and score the first ``limit`` examples of ``data``.

    Under ``torch.distributed`` (every rank calls it) each rank captions its share, the rows are
    gathered, rank 0 alone scores them (one set of Java scorers) and every rank gets rank 0's
    metrics, so all of them decide early stopping alike. A scoring failure is raised on every rank:
    a rank left waiting for metrics would hang.
    """
    world = ranks.world_size()
    rows = generate_captions(
        model,
        data,
        features=features,
        batch_size=batch_size,
        limit=limit,
        rank=ranks.rank(),
        world_size=world,
        **generate_kwargs,
    )
    if world > 1:
        shares: list[Any] = [None] * world
        ranks.process_group().all_gather_object(shares, rows)
        rows = [row for share in shares for row in share]
    return ranks.from_rank_zero(lambda: dict(score(rows)), "scoring the captions")


def score(rows: list[dict[str, Any]]) -> dict[str, float]:
    from vlmkit.evaluate.metrics import exact_match, score_captions

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
    if out_dir is not None:  # before the captioning, not after it
        check_writable_folder(out_dir, "--output")
    started = time.perf_counter()
    rows = generate_captions(
        model, data, batch_size=batch_size, limit=limit, on_batch=on_batch, **generate_kwargs
    )
    metrics = score(rows)
    seconds = time.perf_counter() - started
    out = None
    if out_dir is not None:
        out = make_dirs(out_dir)
        lines = "".join(json.dumps(row) + "\n" for row in rows)
        atomic_write(out / "predictions.jsonl", lambda tmp: tmp.write_text(lines))
        described = metrics.describe() if hasattr(metrics, "describe") else {"metrics": dict(metrics)}
        record = {**described, "count": len(rows), "seconds": round(seconds, 2), **(extra or {})}
        write_json(out / "metrics.json", record)
    return EvalResult(metrics=metrics, predictions=rows, seconds=seconds, out_dir=out)


# ------------------------------------------------------------------------------ image files


@dataclass
class CaptionResult:
    path: str
    caption: str | None = None
    error: str | None = None


def read_image(path: str | Path) -> tuple[object | None, CaptionResult | None]:
    """``(RGB image, None)``, or ``(None, error result)`` when ``path`` is unreadable."""
    try:
        return CaptionExample(id=str(path), captions=[], image=Path(path)).load_image(), None
    except DataError as exc:  # printed on a terminal: a file name's escapes stay text
        return None, CaptionResult(path=str(path), error=printable(str(exc)))


#: a batch of decoded images ends early past this many pixels (192 MB of RGB): eight photos of
#: 80 Mpx would otherwise take 2 GB per batch
MAX_BATCH_PIXELS = 64 * 2**20


def decoded_batches(
    paths: Sequence[str | Path], batch_size: int
) -> Iterator[tuple[list[tuple[str, object]], list[CaptionResult]]]:
    """Batches of up to ``batch_size`` decoded images ``(path, image)`` in the order given (fewer
    when they reach ``MAX_BATCH_PIXELS``), each with the error results of the unreadable files met
    while filling it. Decoded lazily: a caller that drops a batch before asking for the next
    holds one batch of images, however many paths."""
    batch: list[tuple[str, object]] = []
    failed: list[CaptionResult] = []
    pixels = 0
    for path in paths:
        image, error = read_image(path)
        if error is not None:
            failed.append(error)
            continue
        batch.append((str(path), image))
        pixels += image.width * image.height
        if len(batch) == batch_size or pixels >= MAX_BATCH_PIXELS:
            yield batch, failed
            batch, failed, pixels = [], [], 0
    if batch or failed:
        yield batch, failed


def caption_files(
    model,
    paths: Sequence[str | Path],
    *,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
    **generate_kwargs,
) -> list[CaptionResult]:
    """Caption image files in batches, in the order given. ``model`` is anything with
    ``generate(images, **kwargs) -> list[str]`` (a ``PrefixConditioningVLM`` or the ONNX runtime).

    Images are decoded a batch at a time (the next one in a background thread while the model
    captions this one): memory holds two batches of images, not every image of the call."""
    from concurrent.futures import ThreadPoolExecutor

    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    results: dict[str, CaptionResult] = {}
    batches = decoded_batches(paths, batch_size)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(next, batches, None)
        while (item := pending.result()) is not None:
            chunk, failed = item
            pending = pool.submit(next, batches, None)
            results.update((r.path, r) for r in failed)
            if chunk:
                captions = model.generate([img for _, img in chunk], **generate_kwargs)
                for (path, _), text in zip(chunk, captions, strict=True):
                    results[path] = CaptionResult(path=path, caption=text)
            if on_batch:
                on_batch(len(chunk) + len(failed))
            del chunk, item  # the images go before the next batch is decoded
    return [results[str(p)] for p in paths]
