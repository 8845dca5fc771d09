"""``vlmkit eval``: its flags are ``EvalConfig``'s settings (``vlmkit.evaluate.config``); this prints."""

from __future__ import annotations

import json

import typer

from vlmkit.cli.configs import command, configured
from vlmkit.evaluate.config import EvalConfig


def evaluate(
    settings: dict, as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON.")
):
    """Caption a dataset split and score it: BLEU-1..4, METEOR, ROUGE-L, CIDEr, exact match.

    Writes predictions.jsonl (id, prediction, references) and metrics.json.
    """
    from rich.console import Console

    from vlmkit.core.progress import progress_bar
    from vlmkit.evaluate.job import run
    from vlmkit.evaluate.metrics import format_metrics_table

    config = configured(EvalConfig, settings, "vlmkit eval")
    with progress_bar("captioning") as advance:
        result = run(config, on_batch=advance)
    if as_json:
        typer.echo(json.dumps(result.metrics, indent=2))
        return
    Console().print(format_metrics_table({config.split: result.metrics}))
    typer.echo(
        f"{len(result.predictions)} captions in {result.seconds:.1f} s; written to {result.out_dir}", err=True
    )


eval_command = command(EvalConfig, evaluate, renamed={"--out": "--output (-o)"})
