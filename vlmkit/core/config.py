"""The model configuration: which encoder and decoder, the projection, LoRA, the prompt layout.

Saved in every model's manifest and read back by ``load``; torch-free (pydantic only). The run
configuration of ``vlmkit train`` (``vlmkit.train.config``) holds one of these as ``model``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from vlmkit.core.errors import ConfigError
from vlmkit.core.projection import ProjectionConfig


class LoraSettings(BaseModel):
    """LoRA on the decoder; ``targets`` overrides the decoder plugin's ``lora_targets``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    r: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    #: 0 as in peft: on CPU the dropout masks cost ~12% of a training step (benchmarks/RESULTS.md);
    #: raise it (0.05-0.1) for many epochs over a small dataset
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] | None = None


class ModelConfig(BaseModel):
    """Everything needed to build the model; saved in the manifest and read back by ``load``.

    ``encoder`` and ``decoder`` name plugins; they have no default here (core names no plugin):
    ``vlmkit train`` fills in the embedded default from ``vlmkit.recipes`` when none is named.
    """

    model_config = ConfigDict(extra="forbid")

    encoder: str | None = None
    encoder_checkpoint: str | None = None
    encoder_revision: str | None = None
    encoder_options: dict[str, Any] = Field(default_factory=dict)  # the plugin's spec.options validates
    decoder: str | None = None
    decoder_checkpoint: str | None = None
    decoder_revision: str | None = None
    projection: ProjectionConfig = Field(default_factory=ProjectionConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    #: train the encoder's last N blocks too; their batch norm keeps its statistics (small batches)
    unfreeze_encoder_layers: int = Field(0, ge=0)
    prompt: str = ""
    format: Literal["auto", "chat", "plain"] = "auto"
    max_caption_tokens: int = Field(48, gt=0)

    def plugins(self) -> tuple[str, str]:
        """``(encoder, decoder)``; ``ConfigError`` when either is not named."""
        for part in ("encoder", "decoder"):
            if getattr(self, part) is None:
                raise ConfigError(
                    f"model.{part} is not set: name a{'n' if part == 'encoder' else ''} {part} plugin "
                    "('vlmkit plugins list'), or start from vlmkit.recipes.embedded_default()"
                )
        return self.encoder, self.decoder  # type: ignore[return-value]


def encoder_options(spec, config: ModelConfig) -> dict[str, Any]:
    """``{"options": <validated by spec.options>}``, or ``{}`` when ``config`` gives none."""
    model = spec.options or create_model("NoOptions", __config__=ConfigDict(extra="forbid"))
    opts = config.encoder_options
    return {"options": validated(model, opts, f"model.encoder_options ({config.encoder})")} if opts else {}


def validate_model_config(config: Any, source: str = "model config") -> ModelConfig:
    """``config`` (a dict, ``None`` or a ``ModelConfig``) as a validated ``ModelConfig``."""
    return config if isinstance(config, ModelConfig) else validated(ModelConfig, config or {}, source)


def validated(model: type[BaseModel], data: Any, source: str) -> Any:
    """``model.model_validate(data)``, or a one-line ``ConfigError`` naming ``source`` and the field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        # a misspelt key first, a missing one last: the latter is often the former's consequence
        order = {"extra_forbidden": 0, "missing": 2}
        err = sorted(exc.errors(), key=lambda e: order.get(e["type"], 1))[0]
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown setting (check the spelling; 'vlmkit train --help' lists them)"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ConfigError(f"{source}: {field}: {msg}{more}") from exc
