"""``vlmkit caption``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from vlmkit.cli.options import device_option, precision_option
from vlmkit.core.errors import VlmkitError


def caption(
    images: list[Path] = typer.Argument(..., help="Image files to caption (JPEG, PNG, WebP, ...)."),
    model: Path = typer.Option(
        None,
        "--model",
        "-m",
        help="A model folder written by 'vlmkit train', or a merged export ('vlmkit export --format hf').",
    ),
    onnx: Path = typer.Option(
        None, "--onnx", help="Or a folder written by 'vlmkit export --format onnx' (runs without torch)."
    ),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, help="Images per forward pass."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", min=1, help="Longest caption, in tokens."),
    num_beams: int = typer.Option(1, "--num-beams", min=1, help="Beam search width (1 = greedy)."),
    sample: bool = typer.Option(False, "--sample", help="Sample instead of greedy/beam decoding."),
    temperature: float = typer.Option(1.0, "--temperature", min=0.0, help="Sampling temperature."),
    prompt: str = typer.Option(
        None, "--prompt", help="Prompt text (default: the one the model was trained with)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON lines: {path, caption, error}."),
    provider: str = typer.Option(
        None,
        "--provider",
        help="cpu (default) or cuda: ONNX Runtime's execution provider (--onnx only; cuda needs onnxruntime-gpu).",
    ),
    device: str = device_option(note=" (--model only)"),
    precision: str = precision_option(),
) -> None:
    """Write a caption for each image with a trained model (--model) or an ONNX export (--onnx).

    Unreadable images are reported (and make the exit code 1) without stopping the others.
    """
    if (model is None) == (onnx is None):
        raise typer.BadParameter(
            "give exactly one of --model PATH or --onnx DIR", param_hint="--model/--onnx"
        )
    from rich.console import Console
    from rich.progress import Progress

    from vlmkit.evaluate.loop import caption_files
    from vlmkit.sdk.datasets import tsv_field

    if provider is not None and onnx is None:
        raise typer.BadParameter(
            "--provider is for --onnx; with --model use --device", param_hint="--provider"
        )
    if onnx is not None:
        from vlmkit.runtime.onnx import OnnxCaptioner, execution_providers

        vlm = OnnxCaptioner(onnx, providers=execution_providers(provider or "cpu"))
    else:
        import vlmkit
        from vlmkit.core.placement import resolve

        placement = resolve(device, precision)
        typer.echo(f"vlmkit: {placement.describe()}", err=True)
        vlm = vlmkit.load(model, device=placement.device, dtype=placement.precision)
    kwargs = {
        "max_new_tokens": max_new_tokens,
        "num_beams": num_beams,
        "do_sample": sample,
        "temperature": temperature,
    }
    if prompt is not None:
        kwargs["prompt"] = prompt
    # progress on stderr, and only on a terminal: stdout holds the captions alone (a blank line
    # there would become an empty first row of `vlmkit caption *.jpg > captions.tsv`)
    console = Console(stderr=True)
    with Progress(console=console, transient=True, disable=as_json or not console.is_terminal) as progress:
        task = progress.add_task("captioning", total=len(images))
        results = caption_files(
            vlm, images, batch_size=batch_size, on_batch=lambda n: progress.advance(task, n), **kwargs
        )
    for r in results:
        if as_json:
            typer.echo(json.dumps({"path": r.path, "caption": r.caption, "error": r.error}))
        elif r.error:
            typer.secho(f"error: {r.error}", fg="red", err=True)  # the message names the file
        else:
            typer.echo(f"{tsv_field(r.path)}\t{tsv_field(r.caption)}")
    failed = [r for r in results if r.error]
    if failed:
        raise VlmkitError(f"{len(failed)} of {len(results)} images could not be read")
