"""``vlmkit export``: its flags are ``ExportConfig``'s settings (``vlmkit.export.config``); this prints."""

from __future__ import annotations

import json

import typer

from vlmkit.cli.configs import command, configured
from vlmkit.export.config import ExportConfig


def export(settings: dict, as_json: bool = typer.Option(False, "--json", help="Print the result as JSON.")):
    """Export a trained model: ONNX graphs with a KV cache, a browser captioner, or merged HF weights.

    The folder is written under a temporary name and renamed when complete. Caption with the
    ONNX export (or the web one), without torch: 'vlmkit caption --onnx OUTPUT IMAGE...'.
    """
    from rich.console import Console
    from rich.table import Table

    from vlmkit.export import run

    config = configured(ExportConfig, settings, "vlmkit export")
    with Console(stderr=True).status("exporting", spinner="dots") as status:
        result = run(config, on_step=lambda message: status.update(message))
    if as_json:
        payload = {"path": str(result.path), "format": result.format, "files": result.files,
                   "checks": result.checks, "seconds": round(result.seconds, 1)}  # fmt: skip
        if result.payload_bytes is not None:
            payload["payload_bytes"] = result.payload_bytes
        typer.echo(json.dumps(payload))
        return
    table = Table(title=f"{result.path} ({result.format}, {result.seconds:.0f} s)")
    table.add_column("file")
    table.add_column("size", justify="right")
    for name, size in result.files.items():
        table.add_row(name, _size(size))
    Console().print(table)
    for name, value in result.checks.items():
        if name == "caption_agreement":
            typer.echo(
                f"check {name}: {value['identical']} of {value['images']} sample captions identical "
                f"({value['variant']} against {value['vs']})"
            )
        else:
            typer.echo(f"check {name}: {value:.2g}")
    if result.payload_bytes is not None:
        size = _size(result.payload_bytes)
        typer.echo(f"the page downloads {size}; serve it: python -m http.server -d {result.path}")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


export_command = command(ExportConfig, export, renamed={"--out": "--output (-o)"})
