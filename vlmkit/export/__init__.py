"""The export job: a trained model folder -> ONNX graphs for ONNX Runtime, a static folder that
captions in a web browser, or merged HF weights.

- ``--format onnx`` (``vlmkit.export.onnx``): what ``vlmkit.runtime.onnx.OnnxCaptioner`` runs without
  torch; ``--quantize int8|int4`` adds graphs with quantized weights (``vlmkit.export.quantize``).
- ``--format web`` (``vlmkit.export.web``): one variant of the ONNX export (int8 weights unless
  ``--quantize`` says otherwise) with the browser runtime, ``vlmkit-web.js`` and a demo page.
- ``--format hf`` (``vlmkit.export.hf``): the decoder with LoRA merged as a plain transformers
  checkpoint, the projection and a manifest; ``vlmkit.load`` reads it back.

Folders are written under a temporary name next to ``out`` and renamed into place at the end, so
an interrupted export never leaves a folder that looks complete.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmkit.core.artifact import MERGED_MANIFEST
from vlmkit.core.config import validated
from vlmkit.core.errors import ArtifactError, ConfigError
from vlmkit.core.paths import check_writable_folder, staged_folder, writing
from vlmkit.export.config import EMBEDDINGS, FORMATS, QUANTIZATIONS, ExportConfig, check_format_options
from vlmkit.export.steps import step

#: what ``--format web`` uses when ``--quantize`` is not given (onnx: none)
#: int8: on a trained demo model (shapes, 24 held-out images + 3 photos) int8 graphs kept 27 of 27
#: captions identical to fp32, int4 25 of 27 (one shape caption wrong): under the 95% bar
WEB_DEFAULT_QUANTIZE = "int8"
DEFAULT_OPSET = 17
#: scaled_dot_product_attention, which every built-in decoder uses, exports from opset 14 on
MIN_OPSET = 14


@dataclass
class ExportResult:
    """What an export wrote: the folder, its files (name -> bytes) and the checks it passed."""

    path: Path
    format: str
    files: dict[str, int] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    #: web exports: the bytes a browser downloads to caption (graphs, embeddings, tokenizer, runtime)
    payload_bytes: int | None = None


def max_opset() -> int:
    """The newest opset the TorchScript-based exporter of the installed torch writes."""
    try:
        from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET

        return int(ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    except ImportError:  # torch moved its private constants: the last value we know
        return 20


def check_options(
    format: str,
    opset: int | None,
    quantize: str | None,
    out: str | Path,
    overwrite: bool,
    embeddings: str | None = None,
) -> int | None:
    """Refuse bad options before anything is loaded; returns the opset to use (ONNX and web)."""
    check_format_options(format, opset, quantize, embeddings)
    if format == "web":
        from vlmkit.export.web import vendor_files

        vendor_files()  # an installation without the browser runtime fails before the slow part
    if format in ("onnx", "web"):
        opset = DEFAULT_OPSET if opset is None else int(opset)
        high = max_opset()
        if not MIN_OPSET <= opset <= high:
            raise ConfigError(f"ONNX opset {opset} is not supported; choose one from {MIN_OPSET} to {high}")
    _check_out(Path(out), overwrite)
    check_writable_folder(Path(out), "--output")
    return opset


def run(config: ExportConfig, *, registry=None, on_step: Callable[[str], None] | None = None) -> ExportResult:
    """``vlmkit export``: the trained model folder ``config.model`` to the new folder
    ``config.output`` (see the module docstring)."""
    from vlmkit.core.artifact import read_manifest
    from vlmkit.core.model import PrefixConditioningVLM

    manifest = read_manifest(config.model)  # a one-line ArtifactError unless it is a vlmkit model
    options = config.model_dump(exclude={"model", "output"})
    check_options(out=config.output, **options)
    step(on_step, f"loading {config.model}")
    vlm = PrefixConditioningVLM.load(config.model, registry=registry)
    source = {
        "model": str(Path(config.model).resolve()),
        "encoder": manifest.get("encoder"),
        "decoder": manifest.get("decoder"),
    }
    return export_vlm(vlm, config.output, **options, source=source, on_step=on_step)


def export_model(
    model: str | Path, out: str | Path, *, registry=None, on_step=None, **options
) -> ExportResult:
    """``run`` for a model folder and an output folder; ``options`` as ``ExportConfig`` has them
    (``format``, ``opset``, ``quantize``, ``embeddings``, ``overwrite``)."""
    config = validated(ExportConfig, {"model": model, "output": out, **options}, "export")
    return run(config, registry=registry, on_step=on_step)


def export_vlm(
    vlm,
    out: str | Path,
    *,
    format: str = "onnx",
    opset: int | None = None,
    quantize: str | None = None,
    embeddings: str | None = None,
    overwrite: bool = False,
    source: dict[str, Any] | None = None,
    on_step: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export an in-memory ``PrefixConditioningVLM`` (as ``export_model`` does after loading).

    ``quantize``: ``int8``/``int4`` weights, or ``none``; None means the format's default (onnx:
    none, web: int8). ``embeddings`` (web only): the token-embedding table's storage, float16
    (the default) or float32."""
    out = Path(out)
    opset = check_options(format, opset, quantize, out, overwrite, embeddings)
    if quantize is None and format == "web":
        quantize = WEB_DEFAULT_QUANTIZE
    quantize = None if quantize == "none" else quantize
    from vlmkit.export import hf, onnx, web

    if any(p.device.type != "cpu" for p in vlm.parameters()):
        raise ConfigError("export runs on the CPU: move the model there first (vlm.cpu())")
    start = time.perf_counter()
    was_training = vlm.training
    vlm.eval()
    try:
        with writing(out), _staging(out, overwrite) as tmp:
            if format == "onnx":
                checks = onnx.write_onnx(
                    vlm, tmp, opset=opset, quantize=quantize, source=source, on_step=on_step
                )
            elif format == "web":
                checks = web.write_web(
                    vlm,
                    tmp,
                    opset=opset,
                    quantize=quantize,
                    embeddings=embeddings or EMBEDDINGS[0],
                    source=source,
                    on_step=on_step,
                )
            else:
                checks = hf.write_merged(vlm, tmp, source=source, on_step=on_step)
    finally:
        vlm.train(was_training)
    files = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    payload = web.read_web_manifest(out)["web"]["payload_bytes"] if format == "web" else None
    return ExportResult(out, format, files, checks, time.perf_counter() - start, payload)


# ------------------------------------------------------------------------------ output folder


def _check_out(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise ArtifactError(f"{out} exists and is not a folder; choose another --output")
    if not overwrite:
        raise ArtifactError(f"{out} already exists; pass --overwrite to replace it")
    if any(out.iterdir()) and not _is_export(out):
        raise ArtifactError(f"{out} is not a vlmkit export; refusing to replace it (choose another --output)")


def _is_export(path: Path) -> bool:
    from vlmkit.runtime.onnx import MANIFEST as ONNX_MANIFEST  # numpy: not for ``vlmkit export --help``

    return (path / ONNX_MANIFEST).is_file() or (path / MERGED_MANIFEST).is_file()


def _staging(out: Path, overwrite: bool):
    """A temporary folder beside ``out``, renamed to ``out`` when the block succeeds."""

    def replace(existing: Path) -> bool:
        _check_out(existing, overwrite)  # it may have appeared while we were exporting
        return True

    return staged_folder(out, replace)


__all__ = [
    "DEFAULT_OPSET",
    "EMBEDDINGS",
    "ExportConfig",
    "FORMATS",
    "QUANTIZATIONS",
    "MIN_OPSET",
    "ExportResult",
    "check_options",
    "export_model",
    "export_vlm",
    "max_opset",
    "run",
]
