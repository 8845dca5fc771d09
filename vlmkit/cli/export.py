"""``vlmkit export``."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path

import typer


class ExportFormat(StrEnum):
    onnx = "onnx"
    hf = "hf"


class Quantization(StrEnum):
    int8 = "int8"
    int8_dynamic = "int8-dynamic"


def export(
    model: Path = typer.Option(..., "--model", "-m", help="A model folder written by 'vlmkit train'."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="The folder to write (must not exist, see --overwrite)."
    ),
    format: ExportFormat = typer.Option(
        ExportFormat.onnx,
        "--format",
        "-f",
        help="onnx: graphs + manifest for the torch-free ONNX Runtime captioner; "
        "hf: the decoder with LoRA merged, loadable with plain transformers.",
    ),
    opset: int = typer.Option(
        None, "--opset", help="ONNX opset (default 17; 14 up to the exporter's newest)."
    ),
    quantize: Quantization = typer.Option(
        None,
        "--quantize",
        help="Also write int8 graphs (*.int8.onnx). int8: int8 weights and activations in blocks of 128 "
        "(MatMulNBits), captions as fp32's; int8-dynamic: quantize_dynamic, one activation scale per "
        "tensor: fastest, but decoder LMs' outlier channels change captions.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it is an earlier export."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Export a trained model: ONNX graphs with a KV cache (optionally int8), or merged HF weights.

    The folder is written under a temporary name and renamed when complete. Caption with the
    ONNX export, without torch: 'vlmkit caption --onnx OUT IMAGE...'.
    """
    from rich.console import Console

    from vlmkit.core.artifact import read_manifest
    from vlmkit.export import check_options, export_model

    read_manifest(model)  # one-line errors for bad input before anything heavy is imported
    check_options(format.value, opset, quantize.value if quantize else None, out, overwrite)
    console = Console(stderr=True)
    with console.status("exporting", spinner="dots") as status:
        result = export_model(
            model,
            out,
            format=format.value,
            opset=opset,
            quantize=quantize.value if quantize else None,
            overwrite=overwrite,
            on_step=lambda message: status.update(message),
        )
    if as_json:
        payload = {
            "path": str(result.path),
            "format": result.format,
            "files": result.files,
            "checks": result.checks,
            "seconds": round(result.seconds, 1),
        }
        typer.echo(json.dumps(payload))
        return
    from rich.table import Table

    table = Table(title=f"{result.path} ({result.format}, {result.seconds:.0f} s)")
    table.add_column("file")
    table.add_column("size", justify="right")
    for name, size in result.files.items():
        table.add_row(name, _size(size))
    Console().print(table)
    for name, value in result.checks.items():
        typer.echo(f"check {name}: {value:.2g}")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"
