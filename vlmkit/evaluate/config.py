"""The configurations of ``vlmkit eval`` and ``vlmkit caption`` (torch-free). Their flags are
generated from these fields (``vlmkit.cli.configs``): a flag is its key with dashes."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

from vlmkit.core.config import DatasetConfig, Precision, device_setting, precision_setting, setting

MODEL_HELP = "A model folder written by 'vlmkit train'"


def num_beams_setting():
    return setting(1, "Beam search width (1 = greedy).", ge=1)


def max_new_tokens_setting():
    return setting(None, "Longest caption, in tokens (default: the model's).", ge=1)


class EvalConfig(BaseModel):
    """``vlmkit eval``: caption a dataset split with a trained model and score it."""

    model_config = ConfigDict(extra="forbid")

    model: Path = setting(help=f"{MODEL_HELP}.", short="-m")
    datasets: list[DatasetConfig] | None = setting(
        None,
        "Dataset plugin, NAME or NAME:key=value,... (repeat to mix). Default: the datasets the model "
        "was trained on.",
        short="-d",
    )
    split: Literal["train", "validation", "test"] = setting("test", "The split to caption and score.")
    seed: int | None = setting(None, "Split seed (default: the one the model was trained with).")
    max_samples: int | None = setting(None, "Evaluate only the first N examples.", ge=1)
    batch_size: int = setting(32, "Images per generation batch.", short="-b", ge=1)
    num_beams: int = num_beams_setting()
    max_new_tokens: int | None = max_new_tokens_setting()
    output: Path | None = setting(
        None, "Where to write predictions.jsonl and metrics.json (default: MODEL/eval-SPLIT).", short="-o"
    )
    device: str = device_setting()
    precision: Precision = precision_setting()


class CaptionConfig(BaseModel):
    """``vlmkit caption``: a caption for each image file, by a trained model or its ONNX export."""

    # ``--temperature nan`` passes ge=0 and raised inside transformers' sampling
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    images: list[Path] = setting(help="Image files to caption (JPEG, PNG, WebP, ...).", argument=True)
    model: Path | None = setting(
        None, f"{MODEL_HELP}, or a merged export ('vlmkit export --format hf').", short="-m"
    )
    onnx: Path | None = setting(
        None, "Or a folder written by 'vlmkit export --format onnx' (runs without torch)."
    )
    batch_size: int = setting(8, "Images per forward pass.", short="-b", ge=1)
    num_beams: int = num_beams_setting()
    max_new_tokens: int | None = max_new_tokens_setting()
    sample: bool = setting(False, "Sample instead of greedy/beam decoding.")
    temperature: float = setting(1.0, "Sampling temperature.", ge=0.0)
    prompt: str | None = setting(None, "Prompt text (default: the one the model was trained with).")
    provider: Literal["cpu", "cuda"] | None = setting(
        None,
        "ONNX Runtime's execution provider with --onnx: cpu (default) or cuda (needs onnxruntime-gpu).",
    )
    device: str = device_setting(" (with --model)")
    precision: Precision = precision_setting(" (with --model)")

    @model_validator(mode="after")
    def _one_model(self) -> CaptionConfig:
        if (self.model is None) == (self.onnx is None):
            raise ValueError("give exactly one of --model PATH or --onnx DIR")
        if self.provider is not None and self.onnx is None:
            raise ValueError("--provider is for --onnx; with --model use --device")
        placed = [k for k in ("device", "precision") if getattr(self, k) != "auto"]
        if placed and self.onnx is not None:
            raise ValueError(f"--{placed[0]} is for --model; with --onnx use --provider")
        return self
