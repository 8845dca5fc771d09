"""Captioning image files with a saved model (``vlmkit caption``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vlmkit.core.contracts import CaptionExample
from vlmkit.core.errors import DataError


@dataclass
class CaptionResult:
    path: str
    caption: str | None = None
    error: str | None = None


def read_images(paths: Sequence[str | Path]) -> tuple[list[tuple[str, object]], list[CaptionResult]]:
    """Open every path as an RGB image; unreadable ones become error results, not exceptions."""
    images, failed = [], []
    for path in paths:
        try:
            images.append(
                (str(path), CaptionExample(id=str(path), captions=[], image=Path(path)).load_image())
            )
        except DataError as exc:
            failed.append(CaptionResult(path=str(path), error=str(exc)))
    return images, failed


def caption_files(
    model,
    paths: Sequence[str | Path],
    *,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
    **generate_kwargs,
) -> list[CaptionResult]:
    """Caption image files in batches, in the order given. ``model`` is anything with
    ``generate(images, **kwargs) -> list[str]`` (a ``PrefixConditioningVLM`` or the ONNX runtime)."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    images, failed = read_images(paths)
    results = {r.path: r for r in failed}
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        captions = model.generate([img for _, img in chunk], **generate_kwargs)
        for (path, _), text in zip(chunk, captions, strict=True):
            results[path] = CaptionResult(path=path, caption=text)
        if on_batch:
            on_batch(len(chunk))
    return [results[str(p)] for p in paths]
