"""The configuration of ``vlmkit export`` (torch-free); its flags are generated from these fields
(``vlmkit.cli.configs``). The cross-field rules (``check_format_options``) hold for the Python API
too (``vlmkit.export.export_vlm``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

from vlmkit.core.config import setting
from vlmkit.core.errors import ConfigError

FORMATS = ("onnx", "web", "hf")
#: weight-only quantizations (ONNX Runtime's MatMulNBits); ``none`` keeps float32 graphs
QUANTIZATIONS = ("int8", "int4", "none")
#: how the web export stores the token-embedding table
EMBEDDINGS = ("float16", "float32")


class ExportConfig(BaseModel):
    """``vlmkit export``: a trained model folder -> ONNX graphs, a browser captioner or merged HF weights."""

    model_config = ConfigDict(extra="forbid")

    model: Path = setting(help="A model folder written by 'vlmkit train'.", short="-m")
    output: Path = setting(help="The folder to write (must not exist, see --overwrite).", short="-o")
    format: Literal["onnx", "web", "hf"] = setting(
        "onnx",
        "onnx: graphs + manifest for the torch-free ONNX Runtime captioner; web: a static folder that "
        "captions in the browser (onnxruntime-web, vendored; serve it with 'python -m http.server -d "
        "OUTPUT'); hf: the decoder with LoRA merged, loadable with plain transformers.",
        short="-f",
    )
    opset: int | None = setting(None, "ONNX opset (default 17; 14 up to the exporter's newest).")
    quantize: Literal["int8", "int4", "none"] | None = setting(
        None,
        "Weight-only quantization by ONNX Runtime's MatMulNBitsQuantizer. onnx: also write *.int4.onnx "
        "or *.int8.onnx next to the fp32 graphs and caption with them by default (default: none). web: "
        "int8 (default) runs a Llama-block decoder (RMSNorm, rotary attention, SiLU-gated MLP) in the page's own int8 "
        "WebAssembly decoder, ~10x faster than onnxruntime-web's graphs, and other decoders as int8 "
        "onnxruntime-web graphs; int4 and none: onnxruntime-web graphs with int4 or fp32 weights.",
    )
    embeddings: Literal["float16", "float32"] | None = setting(
        None,
        "web only, onnxruntime-web graphs: store the token-embedding table as float16 (default, half the "
        "bytes) or float32 (the page's own decoder keeps it in int8).",
    )
    overwrite: bool = setting(False, "Replace --output if it is an earlier export.")

    @model_validator(mode="after")
    def _format_options(self) -> ExportConfig:
        check_format_options(self.format, self.opset, self.quantize, self.embeddings)
        return self


def check_format_options(
    format: str, opset: int | None, quantize: str | None, embeddings: str | None
) -> None:
    """Refuse options that the format does not take (or that do not exist)."""
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ConfigError(f"unknown quantization {quantize!r}; supported: {', '.join(QUANTIZATIONS)}")
    if format == "hf" and (quantize is not None or opset is not None):
        raise ConfigError("--opset and --quantize apply to --format onnx and web only")
    if embeddings is not None and (format != "web" or embeddings not in EMBEDDINGS):
        raise ConfigError(f"--embeddings applies to --format web only, as one of {', '.join(EMBEDDINGS)}")
