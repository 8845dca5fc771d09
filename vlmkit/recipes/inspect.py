"""``vlmkit inspect``: what the language model is fed for one caption (``vlmkit.explain``), by a
saved model or by a fresh one from a decoder plugin (with the embedded default's encoder unless
another is named: which is why this job lives with the recipes). The configuration is torch-free;
its fields are the command's flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

from vlmkit.core.config import setting

#: settings of a fresh model: a saved one has its own
FRESH = ("decoder_checkpoint", "encoder", "encoder_checkpoint", "prompt_format")


class InspectConfig(BaseModel):
    """``vlmkit inspect``: a caption and the model (saved, or fresh from plugins) that is fed it."""

    model_config = ConfigDict(extra="forbid")

    caption: str | None = setting(
        None, "A caption, shown as training feeds it (default: the generation context alone).", argument=True
    )
    model: Path | None = setting(None, "A model folder written by 'vlmkit train'.", short="-m")
    decoder: str | None = setting(None, "Or a decoder plugin, for a model not trained yet.")
    decoder_checkpoint: str | None = setting(None, "Its checkpoint (with --decoder).")
    encoder: str | None = setting(
        None, "The encoder plugin (with --decoder; default: the embedded default's)."
    )
    encoder_checkpoint: str | None = setting(None, "Its checkpoint (with --encoder).")
    prompt: str | None = setting(None, "Prompt text (default: the model's, or none).")
    prompt_format: Literal["auto", "chat", "plain"] | None = setting(
        None, "auto (the chat template when there is one), chat or plain (with --decoder; default auto)."
    )

    @model_validator(mode="after")
    def _saved_or_fresh(self) -> InspectConfig:
        if (self.model is None) == (self.decoder is None):
            raise ValueError("give exactly one of --model PATH or --decoder NAME")
        given = [f"--{k.replace('_', '-')}" for k in FRESH if getattr(self, k) is not None]
        if self.model is not None and given:
            raise ValueError(f"{', '.join(given)}: a saved model has its own; use them with --decoder")
        return self


def run(config: InspectConfig):
    """The ``vlmkit.explain`` ``Explanation`` of ``config.caption``."""
    import vlmkit
    from vlmkit.recipes import embedded_default

    if config.model is not None:
        vlm = vlmkit.load(config.model)
    else:
        fresh = {k: getattr(config, k) for k in ("decoder", *FRESH)}
        model = {**fresh, "prompt_format": config.prompt_format or "auto", "prompt": config.prompt or ""}
        vlm = vlmkit.build(embedded_default({"model": model})["model"])
    return vlmkit.explain(vlm, config.caption, prompt=config.prompt)
