"""``vlmkit eval``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from vlmkit.cli.options import device_option, precision_option
from vlmkit.core.errors import ConfigError


def eval_command(
    model: Path = typer.Option(..., "--model", "-m", help="A model folder written by 'vlmkit train'."),
    dataset: list[str] = typer.Option(
        None,
        "--dataset",
        "-d",
        help="Dataset plugin, NAME or NAME:key=value,... (repeat to mix). Default: the datasets the model was trained on.",
    ),
    split: str = typer.Option("test", "--split", help="train, validation or test."),
    out: Path = typer.Option(
        None, "--out", help="Where to write predictions.jsonl and metrics.json (default: MODEL/eval-SPLIT)."
    ),
    batch_size: int = typer.Option(32, "--batch-size", "-b", min=1, help="Images per generation batch."),
    max_samples: int = typer.Option(None, "--max-samples", min=1, help="Evaluate only the first N examples."),
    num_beams: int = typer.Option(1, "--num-beams", min=1, help="Beam search width (1 = greedy)."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", min=1, help="Longest caption, in tokens."),
    seed: int = typer.Option(
        None, "--seed", help="Split seed (default: the one the model was trained with)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
    device: str = device_option(),
    precision: str = precision_option(),
) -> None:
    """Caption a dataset split and score it: BLEU-1..4, METEOR, ROUGE-L, CIDEr, exact match.

    Writes predictions.jsonl (id, prediction, references) and metrics.json.
    """
    from vlmkit.cli.train import parse_dataset
    from vlmkit.core.artifact import read_manifest
    from vlmkit.train.config import DatasetConfig

    if split not in ("train", "validation", "test"):
        raise typer.BadParameter("must be train, validation or test", param_hint="--split")
    manifest = read_manifest(model)
    trained = manifest.get("training", {}).get("config", {})
    if dataset:
        datasets = [DatasetConfig(**parse_dataset(d)) for d in dataset]
    elif trained.get("datasets"):
        datasets = [DatasetConfig(**d) for d in trained["datasets"]]
    else:
        raise ConfigError(f"{model} records no training datasets; name one with --dataset")
    split_seed = trained.get("seed", 0) if seed is None else seed

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    import vlmkit
    from vlmkit.evaluate.loop import evaluate
    from vlmkit.evaluate.metrics import format_metrics_table
    from vlmkit.sdk.datasets import load_split

    console = Console(stderr=True)
    data = load_split(datasets, split, seed=split_seed)
    from vlmkit.core.placement import resolve

    placement = resolve(device, precision)
    console.print(f"vlmkit: {placement.describe()}")
    vlm = vlmkit.load(model, device=placement.device, dtype=placement.precision)
    total = min(len(data), max_samples) if max_samples else len(data)
    columns = (TextColumn("captioning"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("captioning", total=total)
        result = evaluate(
            vlm,
            data,
            out_dir=out or Path(model) / f"eval-{split}",
            batch_size=batch_size,
            limit=max_samples,
            on_batch=lambda n: progress.advance(task, n),
            extra={"model": str(model), "split": split, "datasets": [d.model_dump() for d in datasets]},
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
        )
    if as_json:
        typer.echo(json.dumps(result.metrics, indent=2))
        return
    Console().print(format_metrics_table({split: result.metrics}))
    console.print(
        f"{len(result.predictions)} captions in {result.seconds:.1f} s; written to {result.out_dir}"
    )
