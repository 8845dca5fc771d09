"""The run configuration of ``vlmkit train``: a YAML file, overridden by command-line flags.

Torch-free (pydantic and PyYAML only), like ``vlmkit.core.config``. Each setting is declared once,
here: ``vlmkit train``'s flags are generated from these fields, a flag being its key with dashes
(``lr_lora``: ``--lr-lora``; ``model.projection.tokens``: ``--projection-tokens``; a list takes its
flag once per item: ``datasets``, ``--dataset``).

Validated by pydantic; every error names the field (``lr_lora: must be greater than 0``).
A config file looks like::

    model:
      encoder: siglip
      decoder: qwen2
      projection: {type: mlp, reduction: avgpool, tokens: 16}
      lora: {r: 16, alpha: 32}
    datasets:
      - name: folder
        options: {path: ./photos, captions: ./photos/captions.jsonl}
    output: runs/photos
    epochs: 3
    lr_lora: 5.0e-4
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from vlmkit.core.config import (
    DatasetConfig,
    ModelConfig,
    Precision,
    device_setting,
    nested,
    parse_yaml,
    precision_setting,
    setting,
    validated,
)
from vlmkit.core.errors import ConfigError

__all__ = ["DatasetConfig", "TrainConfig", "load_config", "parse_set", "validate_config"]

MODEL, DATA, OPTIMISATION, RUN = "Model", "Data", "Optimisation", "Run"


class TrainConfig(BaseModel):
    """Everything ``vlmkit train`` does, in one validated object (saved with the model)."""

    # inf and nan pass gt=0 (``--epochs inf`` overflowed deep in Trainer; ``--lr-lora inf`` trained NaN)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: ModelConfig = setting(default_factory=ModelConfig, group=MODEL)
    datasets: list[DatasetConfig] = setting(
        help="Dataset plugin, repeat to mix: NAME or NAME:key=value,... e.g. folder:path=./photos "
        "(default: the embedded default's).",
        group=DATA,
        short="-d",
        min_length=1,
    )
    max_train_samples: int | None = setting(None, "Train on the first N examples only.", group=DATA, gt=0)
    max_eval_samples: int | None = setting(200, "Evaluate on the first N examples only.", group=DATA, gt=0)
    feature_cache: bool = setting(
        True, "Train from cached encoder features when the encoder is frozen.", group=DATA
    )
    cache_dir: Path | None = setting(
        None,
        "Feature cache folder (default $VLMKIT_HOME/features); the folder dataset keeps its image checks "
        "in its image-checks/ too.",
        group=DATA,
    )
    num_workers: int | None = setting(
        None,
        "DataLoader worker processes (default: none from the feature cache or on a CPU; min(4, CPUs // 2) "
        "when a GPU trains from images).",
        group=DATA,
        ge=0,
    )

    epochs: float = setting(3.0, "Passes over the training split.", group=OPTIMISATION, gt=0)
    max_steps: int | None = setting(
        None, "Stop after N optimizer steps (overrides epochs).", group=OPTIMISATION, gt=0
    )
    batch_size: int = setting(16, "Examples per step and device.", group=OPTIMISATION, gt=0)
    grad_accum: int = setting(1, "Gradient accumulation steps.", group=OPTIMISATION, gt=0)
    group_by_length: bool = setting(
        False,
        "Batch captions of similar length together: less padding (1.22x per epoch on 5-40 word "
        "captions), but batches less mixed where length follows content.",
        group=OPTIMISATION,
    )
    lr_projection: float = setting(2e-3, "Learning rate of the projection.", group=OPTIMISATION, gt=0)
    lr_lora: float = setting(5e-4, "Learning rate of the LoRA adapter.", group=OPTIMISATION, gt=0)
    lr_encoder: float = setting(1e-5, "Learning rate of unfrozen encoder layers.", group=OPTIMISATION, gt=0)
    weight_decay: float = setting(0.0, "AdamW weight decay.", group=OPTIMISATION, ge=0)
    warmup_ratio: float = setting(0.05, "Warm-up, as a share of the steps.", group=OPTIMISATION, ge=0, lt=1)
    scheduler: Literal["cosine", "linear", "constant_with_warmup"] = setting(
        "cosine", "Learning-rate schedule.", group=OPTIMISATION
    )
    max_grad_norm: float = setting(1.0, "Gradient clipping norm.", group=OPTIMISATION, gt=0)
    gradient_checkpointing: bool = setting(
        False,
        "Recompute the decoder's activations in backward: less memory, more compute.",
        group=OPTIMISATION,
    )
    device: str = device_setting()
    precision: Precision = precision_setting()
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = setting(
        "auto",
        "The decoder's attention kernel; auto: sdpa, eager under bf16 on a CPU. Speed only: a run setting, "
        "not part of the saved model (flash_attention_2 needs flash-attn and a CUDA GPU).",
        group="Device",
    )

    output: Path = setting(Path("runs/default"), "Output folder: the trained model.", group=RUN, short="-o")
    resume: bool = setting(
        False, "Continue the run in --output from its last checkpoint.", group=RUN, exclude=True
    )
    overwrite: bool = setting(False, "Delete the run in --output and start over.", group=RUN, exclude=True)
    seed: int = setting(0, "Random seed (splits, initialisation, order).", group=RUN)
    eval_every: int | None = setting(None, "Evaluate every N steps (default: each epoch).", group=RUN, gt=0)
    eval_metrics: bool = setting(
        False, "Caption the validation split and score BLEU/METEOR/ROUGE-L/CIDEr.", group=RUN
    )
    early_stopping_patience: int | None = setting(
        None, "Stop after N evaluations without improvement (keeps the best).", group=RUN, gt=0
    )
    save_every: int | None = setting(
        None, "Checkpoint every N steps (default: each evaluation).", group=RUN, gt=0
    )
    save_total_limit: int = setting(2, "Checkpoints kept.", group=RUN, gt=0)
    logging_steps: int = setting(10, "Log the loss every N steps.", group=RUN, gt=0)


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    defaults: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> TrainConfig:
    """Read ``path`` (YAML) if given, apply dotted-key ``overrides`` (``{"model.decoder": "qwen2"}``),
    fill in what is still missing with ``defaults(data)`` (``vlmkit train`` passes the embedded
    default of ``vlmkit.recipes``), validate. Raises ``ConfigError`` naming the file and the field."""
    data: dict[str, Any] = {}
    source = "configuration"
    if path is not None:
        path = Path(path)
        source = str(path)
        data = _read_config_file(path)
    nested(overrides or {}, into=data)
    if defaults is not None:
        data = defaults(data)
    return validate_config(data, source)


def _read_config_file(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; pass the YAML file in it")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read ({exc.strerror or exc})") from None
    loaded = parse_yaml(text, str(path))
    if loaded is None:  # an empty file, or only comments: most likely a mistake, not "all defaults"
        raise ConfigError(f"{path} is empty; write settings in it, or drop --config to use the defaults")
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path} must hold a mapping of settings, not a {type(loaded).__name__}")
    return loaded


def parse_set(items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` items as dotted-key overrides (values as YAML)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(
                f"--set {item!r}: use --set KEY=VALUE with a dotted key, e.g. --set model.lora.r=8"
            )
        out[key.strip()] = parse_yaml(value, f"--set {item!r}: the value")
    return out


def validate_config(data: dict[str, Any], source: str = "configuration") -> TrainConfig:
    """``data`` as a ``TrainConfig``; ``ConfigError`` naming ``source`` and the field."""
    return validated(TrainConfig, data, source)
