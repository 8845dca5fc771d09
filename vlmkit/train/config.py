"""The run configuration of ``vlmkit train``: a YAML file, overridden by command-line flags.

Torch-free (pydantic and PyYAML only), like ``vlmkit.core.config``.

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
    output_dir: runs/photos
    epochs: 3
    lr_lora: 5.0e-4
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from vlmkit.core.config import ModelConfig, validated
from vlmkit.core.errors import ConfigError
from vlmkit.train.precision import DEVICE_PATTERN


class DatasetConfig(BaseModel):
    """One dataset of the mix: a dataset plugin name and its options."""

    model_config = ConfigDict(extra="forbid")

    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class TrainConfig(BaseModel):
    """Everything ``vlmkit train`` does, in one validated object (saved with the model)."""

    # inf and nan pass gt=0 (``--epochs inf`` overflowed deep in Trainer; ``--lr-lora inf`` trained NaN)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: ModelConfig = Field(default_factory=ModelConfig)
    datasets: list[DatasetConfig] = Field(min_length=1)
    output_dir: Path = Path("runs/default")
    seed: int = 0

    epochs: float = Field(3.0, gt=0, description="passes over the training split")
    max_steps: int | None = Field(
        None, gt=0, description="stop after this many optimizer steps (overrides epochs)"
    )
    batch_size: int = Field(16, gt=0, description="examples per device per step")
    grad_accum: int = Field(1, gt=0, description="gradient accumulation steps")
    group_by_length: bool = Field(
        False,
        description="batch captions of similar length together: less padding (1.22x per epoch on "
        "5-40 word captions), but batches less mixed where length follows content",
    )
    lr_projection: float = Field(2e-3, gt=0)
    lr_lora: float = Field(5e-4, gt=0)
    lr_encoder: float = Field(1e-5, gt=0, description="for unfrozen encoder layers")
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    max_grad_norm: float = Field(1.0, gt=0)
    device: str = Field(
        "auto",
        pattern=DEVICE_PATTERN,
        description="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps",
    )
    precision: Literal["auto", "fp32", "tf32", "bf16", "fp16"] = Field(
        "auto",
        description="auto: bf16 on CUDA where supported (else fp16), fp32 on MPS, on a CPU the faster of "
        "fp32 and bf16 as measured; bf16/fp16 autocast with the frozen base weights in that dtype",
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute the decoder's activations in backward: less memory, more compute"
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto",
        description="the decoder's attention kernel; auto: sdpa, eager under bf16 on a CPU. Speed only: "
        "a run setting, not part of the saved model (flash_attention_2 needs flash-attn and a CUDA GPU)",
    )

    eval_every: int | None = Field(None, gt=0, description="evaluate every N steps (default: once per epoch)")
    eval_metrics: bool = Field(False, description="caption the validation split and compute BLEU/CIDEr/...")
    max_eval_samples: int | None = Field(200, gt=0)
    early_stopping_patience: int | None = Field(None, gt=0, description="evaluations without improvement")
    save_every: int | None = Field(
        None, gt=0, description="checkpoint every N steps (default: each evaluation)"
    )
    save_total_limit: int = Field(2, gt=0)
    logging_steps: int = Field(10, gt=0)

    feature_cache: bool = Field(
        True, description="train from cached encoder features when the encoder is frozen"
    )
    cache_dir: Path | None = None
    num_workers: int | None = Field(
        None,
        ge=0,
        description="DataLoader worker processes (default: none from the feature cache or on a CPU; "
        "min(4, CPUs // 2) when a GPU trains from images)",
    )
    max_train_samples: int | None = Field(None, gt=0)


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
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        _set_dotted(data, key, value)
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


def parse_yaml(text: str, where: str) -> Any:
    """``text`` as plain YAML data (no tags: nothing is constructed); ``ConfigError`` naming
    ``where`` (a file, or a flag and its value) otherwise."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark and "\n" in text.strip() else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where} is not valid YAML{at}: {problem}") from None


def validate_config(data: dict[str, Any], source: str = "configuration") -> TrainConfig:
    """``data`` as a ``TrainConfig``; ``ConfigError`` naming ``source`` and the field."""
    return validated(TrainConfig, data, source)


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value
