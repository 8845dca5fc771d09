"""``vlmkit export``."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path

import typer


class ExportFormat(StrEnum):
    onnx = "onnx"
    web = "web"
    hf = "hf"


class Quantization(StrEnum):
    int4 = "int4"
    int8 = "int8"
    none = "none"


class Embeddings(StrEnum):
    float16 = "float16"
    float32 = "float32"


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
        "web: a static folder that captions in the browser (onnxruntime-web, vendored; serve it with "
        "'python -m http.server -d OUT'); "
        "hf: the decoder with LoRA merged, loadable with plain transformers.",
    ),
    opset: int = typer.Option(
        None, "--opset", help="ONNX opset (default 17; 14 up to the exporter's newest)."
    ),
    quantize: Quantization = typer.Option(
        None,
        "--quantize",
        help="Weight-only quantization by ONNX Runtime's MatMulNBitsQuantizer. onnx: also write "
        "*.int4.onnx or *.int8.onnx next to the fp32 graphs and caption with them by default (default: "
        "none). web: the graphs the page runs (default: int8, which kept every demo caption; int4 is the smaller download but changed 2 of 27; none: fp32).",
    ),
    embeddings: Embeddings = typer.Option(
        None,
        "--embeddings",
        help="web only: store the token-embedding table as float16 (default, half the bytes) or float32.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it is an earlier export."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Export a trained model: ONNX graphs with a KV cache, a browser captioner, or merged HF weights.

    The folder is written under a temporary name and renamed when complete. Caption with the
    ONNX export (or the web one), without torch: 'vlmkit caption --onnx OUT IMAGE...'.
    """
    from rich.console import Console

    from vlmkit.core.artifact import read_manifest
    from vlmkit.export import check_options, export_model

    read_manifest(model)  # one-line errors for bad input before anything heavy is imported
    quantization = quantize.value if quantize else None
    embedding = embeddings.value if embeddings else None
    check_options(format.value, opset, quantization, out, overwrite, embedding)
    console = Console(stderr=True)
    with console.status("exporting", spinner="dots") as status:
        result = export_model(
            model,
            out,
            format=format.value,
            opset=opset,
            quantize=quantization,
            embeddings=embedding,
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
        if result.payload_bytes is not None:
            payload["payload_bytes"] = result.payload_bytes
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
    if result.payload_bytes is not None:
        typer.echo(
            f"the page downloads {_size(result.payload_bytes)}; serve it: python -m http.server -d {out}"
        )


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"
