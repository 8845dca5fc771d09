"""The model configuration (which encoder and decoder, the projection, LoRA, the prompt layout),
and what every command's configuration is made of.

``ModelConfig`` is saved in every model's manifest and read back by ``load``. The commands'
configurations (``TrainConfig``, ``EvalConfig``, ...) live in their job packages and declare each
setting once, with ``setting()``: its default, its help and its help group. The CLI is generated
from those fields (``vlmkit.cli.configs``), so a flag is its key: ``lr_lora`` is ``--lr-lora``,
``model.lora.r`` is ``--lora-r`` (the ``model`` section needs no prefix).

Torch-free (pydantic and PyYAML only).
"""

from __future__ import annotations

from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from vlmkit.core.errors import ConfigError
from vlmkit.core.placement import DEVICE_PATTERN
from vlmkit.core.projection import ProjectionConfig

#: settings that were renamed: a file that still uses the old key is told the new one
RENAMED = {"output_dir": "output"}


def setting(default: Any = ..., help: str = "", *, group: str | None = None, short: str | None = None,
            argument: bool = False, **constraints: Any) -> Any:  # fmt: skip
    """A field of a command's configuration: ``Field(default, description=help, **constraints)``
    plus what the generated CLI needs: the help ``group`` (a panel of ``--help``), a ``short``
    flag (``-o``), or ``argument=True`` for a positional argument."""
    extra = {k: v for k, v in (("group", group), ("short", short), ("argument", argument)) if v}
    if "default_factory" not in constraints:
        constraints["default"] = default
    return Field(description=help or None, json_schema_extra=extra or None, **constraints)


class LoraSettings(BaseModel):
    """LoRA on the decoder; ``targets`` overrides the decoder plugin's ``lora_targets``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha (the update is scaled by alpha / r).")
    #: 0 as in peft: on CPU the dropout masks cost ~12% of a training step (benchmarks/RESULTS.md)
    dropout: float = Field(
        0.0, ge=0, lt=1, description="LoRA dropout; 0.05-0.1 for many epochs over a small dataset."
    )
    targets: list[str] | None = Field(
        None, description="Module names to adapt (default: the decoder plugin's), e.g. q_proj."
    )


class ModelConfig(BaseModel):
    """Everything needed to build the model; saved in the manifest and read back by ``load``.

    ``encoder`` and ``decoder`` name plugins; they have no default here (core names no plugin):
    ``vlmkit train`` fills in the embedded default from ``vlmkit.recipes`` when none is named.
    """

    model_config = ConfigDict(extra="forbid")

    encoder: str | None = Field(None, description="Encoder plugin ('vlmkit plugins list' shows them).")
    encoder_checkpoint: str | None = Field(
        None, description="Encoder checkpoint: hub id, local path or named checkpoint."
    )
    encoder_revision: str | None = Field(None, description="Hub revision of the encoder checkpoint.")
    # the plugin's spec.options validates them
    encoder_options: dict[str, Any] = Field(
        default_factory=dict, description="Encoder plugin options, key=value,... e.g. features=[4]."
    )
    decoder: str | None = Field(None, description="Decoder plugin ('vlmkit plugins list' shows them).")
    decoder_checkpoint: str | None = Field(
        None, description="Decoder checkpoint: hub id, local path or named checkpoint."
    )
    decoder_revision: str | None = Field(None, description="Hub revision of the decoder checkpoint.")
    projection: ProjectionConfig = Field(default_factory=ProjectionConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    #: their batch norm keeps its statistics (small batches)
    unfreeze_encoder_layers: int = Field(
        0,
        ge=0,
        description="Train the encoder's last N blocks too (no feature cache then; batch-norm statistics "
        "stay fixed).",
    )
    prompt: str = Field("", description="Prompt shown with every image (default: none).")
    prompt_format: Literal["auto", "chat", "plain"] = Field(
        "auto",
        description="Prompt layout: auto (the chat template when the tokenizer has one), chat or plain.",
    )
    max_caption_tokens: int = Field(48, gt=0, description="Longest training caption, in tokens.")

    @model_validator(mode="before")
    @classmethod
    def _saved_format_key(cls, data: Any) -> Any:
        # models saved before prompt_format had this name call it "format"
        if isinstance(data, dict) and "format" in data and "prompt_format" not in data:
            data = {k if k != "format" else "prompt_format": v for k, v in data.items()}
        return data

    def plugins(self) -> tuple[str, str]:
        """``(encoder, decoder)``; ``ConfigError`` when either is not named."""
        for part in ("encoder", "decoder"):
            if getattr(self, part) is None:
                raise ConfigError(
                    f"model.{part} is not set: name a{'n' if part == 'encoder' else ''} {part} plugin "
                    "('vlmkit plugins list'), or start from vlmkit.recipes.embedded_default()"
                )
        return self.encoder, self.decoder  # type: ignore[return-value]


class DatasetConfig(BaseModel):
    """One dataset of the mix: a dataset plugin name and its options. Written as a mapping
    (``{name: folder, options: {path: ./photos}}``) or as ``NAME:key=value,key=value`` (the form
    ``--dataset`` takes; values are YAML: ``colors=[red, blue]``)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, data: Any) -> Any:
        if not isinstance(data, str):
            return data
        name, _, rest = data.partition(":")
        return {"name": name.strip(), "options": parse_mapping(rest, f"--dataset {data!r}")}


#: ``precision`` of every command that runs a model in PyTorch
Precision = Literal["auto", "fp32", "tf32", "bf16", "fp16"]


def device_setting(help_more: str = "") -> Any:
    """The ``device`` setting of every command that runs a model in PyTorch."""
    help = f"auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps{help_more}."
    return setting("auto", help, group="Device", pattern=DEVICE_PATTERN)


def precision_setting(help_more: str = "") -> Any:
    """The ``precision`` setting (type ``Precision``) of every command that runs a model in PyTorch."""
    help = (
        "auto: bf16 on CUDA where supported (else fp16), fp32 on MPS, on a CPU the faster of fp32 and "
        f"bf16 as measured; or fp32, tf32, bf16, fp16{help_more}."
    )
    return setting("auto", help, group="Device")


def parse_mapping(text: str, where: str) -> dict[str, Any]:
    """``key=value,key=value`` (values as YAML; commas inside brackets stay: ``colors=[red,blue]``)
    as a dict; ``ConfigError`` naming ``where`` otherwise."""
    out = {}
    for part in filter(None, _split_top_level(text)):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{where}: options must look like NAME:key=value,key=value")
        out[key.strip()] = parse_yaml(value, f"{where}: the value of {key.strip()!r}")
    return out


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
        field = "".join(f"{p}: " if i == len(err["loc"]) - 1 else f"{p}." for i, p in enumerate(err["loc"]))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            renamed = RENAMED.get(str(err["loc"][-1]))
            msg = (
                f"renamed to {renamed}"
                if renamed
                else "unknown setting (check the spelling; --help lists them)"
            )
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ConfigError(f"{source}: {field}{msg}{more}") from exc


def nested(settings: dict[str, Any], into: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"model.lora.r": 8}`` -> ``{"model": {"lora": {"r": 8}}}``, merged ``into`` a mapping
    (a config file's); ``None`` values are left out (a flag not given)."""
    data = into if into is not None else {}
    for key, value in settings.items():
        if value is None:
            continue
        *parents, last = key.split(".")
        node = data
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[last] = value
    return data
