"""``vlmkit caption``: its flags are ``CaptionConfig``'s settings (``vlmkit.evaluate.config``); this
prints a caption a line (tab-separated with the path) or JSON lines."""

from __future__ import annotations

import json

import typer

from vlmkit.cli.configs import command, configured
from vlmkit.core.errors import VlmkitError
from vlmkit.evaluate.config import CaptionConfig


def caption(
    settings: dict,
    as_json: bool = typer.Option(False, "--json", help="Print JSON lines: {path, caption, error}."),
) -> None:
    """Write a caption for each image with a trained model (--model) or an ONNX export (--onnx).

    Unreadable images are reported (and make the exit code 1) without stopping the others.
    """
    from vlmkit.core.progress import progress_bar
    from vlmkit.evaluate.job import caption as caption_images
    from vlmkit.sdk.datasets import tsv_field

    config = configured(CaptionConfig, settings, "vlmkit caption")
    # progress on stderr, and only on a terminal: stdout holds the captions alone (a blank line
    # there would become an empty first row of `vlmkit caption *.jpg > captions.tsv`)
    with progress_bar("captioning", enabled=None if not as_json else False) as advance:
        results = caption_images(config, on_batch=advance)
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


caption_command = command(CaptionConfig, caption)
