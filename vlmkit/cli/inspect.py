"""``vlmkit inspect``: its flags are ``InspectConfig``'s settings (``vlmkit.recipes.inspect``); this
prints the sequence as a table or JSON."""

from __future__ import annotations

import json

import typer

from vlmkit.cli.configs import command, configured
from vlmkit.recipes.inspect import InspectConfig


def inspect(
    settings: dict,
    as_json: bool = typer.Option(False, "--json", help="Print JSON: every position with its part and label."),
) -> None:
    """Show what the LM is fed for one caption: token ids, pieces, image slots, labelled positions.

    The sequence exactly as training builds it (vlmkit.explain): the image prefix between the
    prompt's parts, labels on the caption and the end token only.
    """
    from vlmkit.recipes.inspect import run

    explanation = run(configured(InspectConfig, settings, "vlmkit inspect"))
    typer.echo(json.dumps(explanation.to_dict(), indent=2) if as_json else str(explanation))


inspect_command = command(InspectConfig, inspect, renamed={"--format": "--prompt-format"})
