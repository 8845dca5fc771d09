"""The export job: a trained model folder -> ONNX graphs for ONNX Runtime, or merged HF weights.

``--format onnx`` writes what ``vlmkit.runtime.onnx.OnnxCaptioner`` runs without torch (see that
module for the folder layout):

- ``vision.onnx``: encoder + projection (token reduction included), pixels -> prefix embeddings.
- ``decoder.onnx``: the LM with its LoRA merged (on a copy), one generation step with a key/value
  cache. It takes ``inputs_embeds`` rather than token ids so that the runtime can splice the image
  prefix in, and the token-embedding table travels as ``embed_tokens.npy``. The same graph serves
  the first step (past length 0) and every later one (one token each).
- ``vlmkit-onnx.json``: the graphs' inputs/outputs, the past key/value layout, the prompt's token
  ids as the decoder plugin formats them, stop/pad ids, and the encoder's preprocessing as data.
- ``--quantize int8`` (or ``int8-dynamic``): ``*.int8.onnx`` next to the float32 graphs, with
  int8 MatMul/Gemm weights (see ``quantize_int8`` for the two methods).

Export uses torch's TorchScript-based ONNX exporter (``dynamo=False``): it exports the
``DynamicCache`` path of every built-in decoder family (Llama, Qwen2, Phi, Phi-3, GPT-2) with
dynamic batch and sequence axes, and needs no extra package. Every export is checked: the
graphs are run once with ONNX Runtime against PyTorch, and the runtime's numpy preprocessing
against the encoder plugin's own, before the folder is published.

``--format hf`` writes the decoder with LoRA merged as a plain transformers checkpoint
(``decoder/``, tokenizer and chat template included: no peft needed), the projection weights and
a manifest naming the encoder; ``load_hf_export`` rebuilds a captioner from it.

Folders are written under a temporary name next to ``out`` and renamed into place at the end, so
an interrupted export never leaves a folder that looks complete.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
import math
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vlmkit import __version__
from vlmkit.core.errors import ArtifactError, ConfigError, ExportError, VlmkitError
from vlmkit.core.paths import read_json_manifest
from vlmkit.runtime import onnx as onnx_runtime

log = logging.getLogger(__name__)

FORMATS = ("onnx", "hf")
#: ``--quantize`` choice -> ``quantize_int8`` method (the variant is called ``int8`` either way)
QUANTIZATIONS = {"int8": "blockwise", "int8-dynamic": "dynamic"}
HF_MANIFEST = "vlmkit-hf.json"
HF_FORMAT = "vlmkit-hf"
HF_FORMAT_VERSION = 1
DEFAULT_OPSET = 17
#: scaled_dot_product_attention, which every built-in decoder uses, exports from opset 14 on
MIN_OPSET = 14

#: how far the ONNX graphs may drift from PyTorch (float32, relative to the largest output value)
#: before the export is refused
TOLERANCE = 1e-4
#: how far the runtime's preprocessing may differ from the encoder plugin's (pixel values)
PREPROCESSING_TOLERANCE = 1e-4


@dataclass
class ExportResult:
    """What an export wrote: the folder, its files (name -> bytes) and the checks it passed."""

    path: Path
    format: str
    files: dict[str, int] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def max_opset() -> int:
    """The newest opset the TorchScript-based exporter of the installed torch writes."""
    try:
        from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET

        return int(ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    except ImportError:  # torch moved its private constants: the last value we know
        return 20


def check_options(
    format: str, opset: int | None, quantize: str | None, out: str | Path, overwrite: bool
) -> int | None:
    """Refuse bad options before anything is loaded; returns the opset to use (ONNX only)."""
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ConfigError(f"unknown quantization {quantize!r}; supported: {', '.join(QUANTIZATIONS)}")
    if format == "hf" and (quantize is not None or opset is not None):
        raise ConfigError("--opset and --quantize apply to --format onnx only")
    if format == "onnx":
        opset = DEFAULT_OPSET if opset is None else int(opset)
        high = max_opset()
        if not MIN_OPSET <= opset <= high:
            raise ConfigError(f"ONNX opset {opset} is not supported; choose one from {MIN_OPSET} to {high}")
    _check_out(Path(out), overwrite)
    return opset


def export_model(
    model: str | Path,
    out: str | Path,
    *,
    format: str = "onnx",
    opset: int | None = None,
    quantize: str | None = None,
    overwrite: bool = False,
    registry=None,
    on_step: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export the trained model folder ``model`` to the new folder ``out`` (see the module docstring)."""
    from vlmkit.core.model import PrefixConditioningVLM, read_manifest

    manifest = read_manifest(model)  # a one-line ArtifactError unless ``model`` is a vlmkit model
    check_options(format, opset, quantize, out, overwrite)
    _step(on_step, f"loading {model}")
    vlm = PrefixConditioningVLM.load(model, registry=registry)
    source = {
        "model": str(Path(model).resolve()),
        "encoder": manifest.get("encoder"),
        "decoder": manifest.get("decoder"),
    }
    return export_vlm(
        vlm,
        out,
        format=format,
        opset=opset,
        quantize=quantize,
        overwrite=overwrite,
        source=source,
        on_step=on_step,
    )


def export_vlm(
    vlm,
    out: str | Path,
    *,
    format: str = "onnx",
    opset: int | None = None,
    quantize: str | None = None,
    overwrite: bool = False,
    source: dict[str, Any] | None = None,
    on_step: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export an in-memory ``PrefixConditioningVLM`` (as ``export_model`` does after loading)."""
    out = Path(out)
    opset = check_options(format, opset, quantize, out, overwrite)
    if any(p.device.type != "cpu" for p in vlm.parameters()):
        raise ConfigError("export runs on the CPU: move the model there first (vlm.cpu())")
    start = time.perf_counter()
    was_training = vlm.training
    vlm.eval()
    try:
        with _staging(out, overwrite) as tmp:
            if format == "onnx":
                checks = _export_onnx(
                    vlm, tmp, opset=opset, quantize=quantize, source=source, on_step=on_step
                )
            else:
                checks = _export_hf(vlm, tmp, source=source, on_step=on_step)
    finally:
        vlm.train(was_training)
    files = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    return ExportResult(out, format, files, checks, time.perf_counter() - start)


# ------------------------------------------------------------------------------ output folder


def _check_out(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise ArtifactError(f"{out} exists and is not a folder; choose another --out")
    if not overwrite:
        raise ArtifactError(f"{out} already exists; pass --overwrite to replace it")
    if any(out.iterdir()) and not _is_export(out):
        raise ArtifactError(f"{out} is not a vlmkit export; refusing to replace it (choose another --out)")


def _is_export(path: Path) -> bool:
    return (path / onnx_runtime.MANIFEST).is_file() or (path / HF_MANIFEST).is_file()


@contextlib.contextmanager
def _staging(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary folder beside ``out``, renamed to ``out`` when the block succeeds."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}.partial-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            _check_out(out, overwrite)  # it may have appeared while we were exporting
            old = out.parent / f".{out.name}.replaced-{tag}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _step(on_step: Callable[[str], None] | None, message: str) -> None:
    log.info("%s", message)
    if on_step is not None:
        on_step(message)


# ------------------------------------------------------------------------------ ONNX


def _export_onnx(vlm, folder: Path, *, opset: int, quantize: str | None, source, on_step) -> dict[str, Any]:
    checks: dict[str, Any] = {}
    _step(on_step, "describing the image preprocessing")
    preprocessing = describe_preprocessing(vlm.encoder)
    checks["preprocessing_max_abs_diff"] = _check_preprocessing(vlm.encoder, preprocessing)

    _step(on_step, "exporting the vision graph (encoder + projection)")
    vision = VisionGraph(vlm.encoder, vlm.projection).eval()
    pixels = vlm.preprocess(probe_images()[:2]).float()
    _onnx_export(
        vision,
        (pixels,),
        folder / "vision.onnx",
        opset=opset,
        input_names=["pixel_values"],
        output_names=["prefix_embeds"],
        dynamic_axes={"pixel_values": {0: "batch"}, "prefix_embeds": {0: "batch"}},
        what="vision graph",
    )

    _step(on_step, "merging LoRA into a copy of the decoder")
    lm = merged_decoder(vlm)
    layout = _kv_layout(lm)
    step = DecoderStep(lm, layout["num_layers"]).eval()
    names = [f"{i}.{kv}" for i in range(layout["num_layers"]) for kv in ("key", "value")]
    past_in, present_out = [f"past_key_values.{n}" for n in names], [f"present.{n}" for n in names]
    _step(on_step, "exporting the decoder graph (with key/value cache)")
    # Traced with a non-empty past and several new tokens, so that no shape is a constant 0 or 1.
    dummy = _decoder_inputs(layout, batch=2, past=2, new=3, seed=0)
    _onnx_export(
        step,
        tuple(dummy.values()),
        folder / "decoder.onnx",
        opset=opset,
        input_names=list(dummy),
        output_names=["logits", *present_out],
        dynamic_axes={
            "inputs_embeds": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "total_sequence"},
            "position_ids": {0: "batch", 1: "sequence"},
            "logits": {0: "batch"},
            **{name: {0: "batch", 2: "past_sequence"} for name in past_in},
            **{name: {0: "batch", 2: "total_sequence"} for name in present_out},
        },
        what="decoder graph",
    )
    embed = lm.get_input_embeddings().weight.detach().float().numpy()
    np.save(folder / "embed_tokens.npy", np.ascontiguousarray(embed))

    _step(on_step, "saving the tokenizer")
    tokenizer = vlm.tokenizer
    if not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ExportError(
            "ONNX export needs a fast tokenizer (tokenizer.json); this decoder's tokenizer is not one"
        )
    tokenizer.save_pretrained(str(folder))

    _step(on_step, "checking the graphs against PyTorch")
    checks["vision_max_rel_diff"] = _check_vision(folder / "vision.onnx", vision, pixels)
    checks["decoder_max_rel_diff"] = _check_decoder(folder / "decoder.onnx", step, layout)

    variants = {"fp32": {"vision": "vision.onnx", "decoder": "decoder.onnx"}}
    if quantize is not None:
        method = QUANTIZATIONS[quantize]
        _step(on_step, f"quantizing MatMul/Gemm weights to int8 ({method})")
        for name in ("vision", "decoder"):
            quantize_int8(folder / f"{name}.onnx", folder / f"{name}.int8.onnx", method)
        variants["int8"] = {"vision": "vision.int8.onnx", "decoder": "decoder.int8.onnx", "method": method}

    _warn_generation_config(lm)
    formatted = vlm.format(None)
    manifest = {
        "format": onnx_runtime.FORMAT,
        "format_version": onnx_runtime.FORMAT_VERSION,
        "vlmkit_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": source or {},
        "opset": opset,
        "exporter": f"torch {torch.__version__} torch.onnx (TorchScript)",
        "variants": variants,
        "default_variant": "fp32" if quantize is None else "int8",
        "embed_tokens": "embed_tokens.npy",
        "tokenizer": "tokenizer.json",
        "vision": {
            "input": "pixel_values",
            "output": "prefix_embeds",
            "input_shape": ["batch", 3, *preprocessing["input_size"]],
            "output_shape": ["batch", vlm.num_prefix_tokens, int(embed.shape[1])],
            "prefix_tokens": vlm.num_prefix_tokens,
        },
        "decoder": {
            "inputs": list(dummy),
            "outputs": ["logits", *present_out],
            "model_type": lm.config.model_type,
            "hidden_size": int(embed.shape[1]),
            "vocab_size": int(embed.shape[0]),
            "num_layers": layout["num_layers"],
            "num_kv_heads": layout["num_kv_heads"],
            "head_dim": layout["head_dim"],
            "dtype": "float32",
            "past_shape": ["batch", layout["num_kv_heads"], "past_sequence", layout["head_dim"]],
            "logits": "last position only: [batch, 1, vocab]",
        },
        "tokens": {
            "prompt": vlm.settings.prompt,
            "style": vlm.settings.format,
            "before": list(formatted.before),
            "after": list(formatted.after),
            "stop_ids": list(vlm.stop_token_ids),
            "pad_id": int(vlm.pad_token_id),  # what PyTorch generation feeds rows that have stopped
            "clean_up_tokenization_spaces": _cleans_up_spaces(tokenizer),
        },
        "generation": {"strategy": "greedy", "max_new_tokens": vlm.settings.max_caption_tokens},
        "preprocessing": preprocessing,
        "checks": checks,
    }
    (folder / onnx_runtime.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return checks


def merged_decoder(vlm):
    """A float32 copy of the decoder with its LoRA merged into the base weights (no peft left)."""
    lm = copy.deepcopy(vlm.lm)
    merged = lm.merge_and_unload() if hasattr(lm, "merge_and_unload") else lm
    merged = merged.float().eval()
    merged.requires_grad_(False)
    return merged


def quantize_int8(source: Path, target: Path, method: str = "dynamic") -> None:
    """int8 weights for every MatMul/Gemm with a constant weight, activations float at the graph's
    edges. ``method``:

    - ``dynamic``: ONNX Runtime's ``quantize_dynamic``: per-channel int8 weights, each activation
      tensor quantized to uint8 at run time with one scale for the whole tensor. Fastest; but
      one outlier channel sets the scale for all, and decoder LMs have such channels.
    - ``blockwise``: ``MatMulNBits`` (8 bits): int8 weights in blocks of 128 along the input
      dimension with a scale each (ONNX Runtime's own default block), activations quantized per
      block at run time (``accuracy_level`` 4), so an outlier spoils only its block.

    EfficientNet-Lite0 + SmolLM2-135M trained on ``shapes`` (fp32: 28 of 28 held-out shapes
    right), 32 images: ``blockwise`` gave 31 captions identical to fp32 (the other on a photo, not
    a shape) at 1.2-1.6x fp32's speed, ``dynamic`` 18 at 1.5x: SmolLM2 has activation channels
    10^4 times the mean (a ``down_proj`` input), which one scale per tensor cannot hold.
    """
    if method == "blockwise":
        _quantize_blockwise(source, target)
        return
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # it logs "consider pre-processing" on the root logger, every time
    try:
        quantize_dynamic(
            str(source),
            str(target),
            op_types_to_quantize=["MatMul", "Gemm"],
            weight_type=QuantType.QInt8,
            per_channel=True,
            extra_options={"MatMulConstBOnly": True},
        )
    finally:
        root.setLevel(level)


def _quantize_blockwise(source: Path, target: Path, block_size: int = 128, accuracy_level: int = 4) -> None:
    """Rewrite ``MatMul(x, W)`` with a constant float ``W [K, N]`` as ``MatMulNBits`` (bits=8):
    symmetric int8 per block of ``block_size`` inputs, stored offset by 128 (the op's default zero
    point), one float scale per block and output."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))
    weights = {t.name: t for t in model.graph.initializer}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    nodes = []
    for node in model.graph.node:
        found = _constant_weight(node, weights)
        if found is None:
            nodes.append(node)
            continue
        w, matrix, bias = found  # matrix: [K, N]
        k, n = matrix.shape
        blocks = -(-k // block_size)
        wt = np.zeros((n, blocks * block_size), dtype=np.float32)
        wt[:, :k] = matrix.T
        wt = wt.reshape(n, blocks, block_size)
        scale = np.maximum(np.abs(wt).max(-1), np.float32(1e-12)) / np.float32(127.0)
        q = (np.clip(np.rint(wt / scale[..., None]), -127, 127) + 128).astype(np.uint8)
        packed = numpy_helper.from_array(q, f"{w.name}.int8")
        scales = numpy_helper.from_array(scale.astype(np.float32).reshape(-1), f"{w.name}.scales")
        model.graph.initializer.extend([packed, scales])
        # a Gemm's bias is added after (it may be computed, and Gemm broadcasts it)
        product = f"{node.output[0]}.int8" if bias else node.output[0]
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                [node.input[0], packed.name, scales.name],
                [product],
                name=f"{node.name}.int8",
                domain="com.microsoft",
                K=k,
                N=n,
                bits=8,
                block_size=block_size,
                accuracy_level=accuracy_level,
            )
        )
        if bias:
            nodes.append(
                helper.make_node("Add", [product, bias], list(node.output), name=f"{node.name}.bias")
            )
        uses[w.name] -= 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    kept = [t for t in model.graph.initializer if uses.get(t.name, 1) > 0]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    if not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(target))


def _constant_weight(node, weights) -> tuple[Any, np.ndarray, str | None] | None:
    """``(initializer, W [K, N], bias name)`` when ``node`` multiplies by a constant float matrix:
    ``MatMul(x, W)``, or ``Gemm(x, W[, bias])`` with alpha = beta = 1 and x not transposed."""
    import onnx
    from onnx import helper, numpy_helper

    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
        return None
    w = weights.get(node.input[1])
    if w is None or len(w.dims) != 2 or w.data_type != onnx.TensorProto.FLOAT:
        return None
    matrix = numpy_helper.to_array(w)
    if node.op_type == "MatMul":
        return w, matrix, None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        return None
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    return w, (matrix.T if attrs.get("transB", 0) else matrix), bias


def _onnx_export(module, args, path: Path, *, opset: int, what: str, **kwargs) -> None:
    try:
        with _quiet_export(), _export_friendly_adaptive_pooling(), torch.no_grad():
            torch.onnx.export(module, args, str(path), opset_version=opset, dynamo=False, **kwargs)
    except VlmkitError:
        raise
    except Exception as exc:  # noqa: BLE001 - exporter errors come in every type; report one line
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ExportError(f"ONNX export of the {what} failed (opset {opset}): {first[:300]}") from exc


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    # The tracer warns about every Python-level shape check it freezes; the checks after export
    # are what tell us whether the graph is right.
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "transformers")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


@contextlib.contextmanager
def _export_friendly_adaptive_pooling() -> Iterator[None]:
    """ONNX has no adaptive average pooling; torch exports it only when the output size divides the
    input size (a 7x7 grid pooled to 4x4 does not). While exporting, such pooling is computed as
    the same averages written as two small matrix products (pooling is separable)."""

    original = torch.nn.functional.adaptive_avg_pool2d

    def pool(x, output_size):
        rows, cols = x.shape[-2:]
        out_r, out_c = (output_size, output_size) if isinstance(output_size, int) else output_size
        out_r, out_c = out_r or rows, out_c or cols
        if rows % out_r == 0 and cols % out_c == 0:
            return original(x, output_size)
        pr = _pooling_matrix(int(rows), int(out_r)).to(x.dtype)
        pc = _pooling_matrix(int(cols), int(out_c)).to(x.dtype)
        return torch.einsum("...rc,ir,jc->...ij", x, pr, pc)

    torch.nn.functional.adaptive_avg_pool2d = pool
    try:
        yield
    finally:
        torch.nn.functional.adaptive_avg_pool2d = original


def _pooling_matrix(size: int, out: int):
    """[out, size]: row i averages the cells adaptive pooling gives output i."""
    m = torch.zeros(out, size)
    for i in range(out):
        lo, hi = (i * size) // out, math.ceil((i + 1) * size / out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


class VisionGraph(nn.Module):
    """Pixels -> prefix embeddings: the frozen encoder, then the projection."""

    def __init__(self, encoder, projection) -> None:
        super().__init__()
        self.encoder, self.projection = encoder, projection

    def forward(self, pixel_values):
        return self.projection(self.encoder(pixel_values))


class DecoderStep(nn.Module):
    """One decoder step over flat past tensors (``key0, value0, key1, ...``), returning last-position
    logits and the flat present tensors. ONNX graphs take tensors, not cache objects: the wrapper
    rebuilds a ``DynamicCache`` from them on the way in and flattens it on the way out."""

    def __init__(self, lm, num_layers: int) -> None:
        super().__init__()
        self.lm = lm
        self.num_layers = num_layers
        self.cache_arg = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        cache = _make_cache(list(zip(past[0::2], past[1::2], strict=True)), self.lm.config)
        out = self.lm(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,  # the next token needs the last position only
            **{self.cache_arg: cache},
        )
        return (out.logits, *_flatten_cache(_output_cache(out), self.num_layers))


def _make_cache(pairs, config):
    from transformers import DynamicCache

    try:
        return DynamicCache(ddp_cache_data=pairs, config=config)
    except TypeError:  # transformers 4.x
        return DynamicCache.from_legacy_cache(tuple(pairs))


def _output_cache(out):
    cache = out.get("cache")  # transformers 5 ("past_key_values" before)
    return cache if cache is not None else out.get("past_key_values")


def _flatten_cache(cache, num_layers: int) -> list:
    flat = []
    if hasattr(cache, "layers"):
        for layer in cache.layers[:num_layers]:
            flat += [layer.keys, layer.values]
    else:  # transformers 4.x
        for keys, values in cache.to_legacy_cache()[:num_layers]:
            flat += [keys, values]
    return flat


def _kv_layout(lm) -> dict[str, int]:
    """Layers, key/value heads and head size, read off one forward pass (no config guessing)."""
    dim = lm.get_input_embeddings().embedding_dim
    with torch.no_grad():
        out = lm(inputs_embeds=torch.zeros(1, 2, dim), use_cache=True)
    cache = _output_cache(out)
    num_layers = lm.config.get_text_config().num_hidden_layers
    shapes = {tuple(t.shape[1::2]) for t in _flatten_cache(cache, num_layers)}
    if len(shapes) != 1:
        raise ExportError(f"the decoder's layers cache keys/values of different shapes {sorted(shapes)}")
    ((heads, head_dim),) = shapes
    return {
        "num_layers": int(num_layers),
        "num_kv_heads": int(heads),
        "head_dim": int(head_dim),
        "hidden_size": dim,
    }


def _decoder_inputs(layout: dict[str, int], *, batch: int, past: int, new: int, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    inputs: dict[str, Any] = {
        "inputs_embeds": torch.randn(batch, new, layout["hidden_size"], generator=g),
        "attention_mask": torch.ones(batch, past + new, dtype=torch.long),
        "position_ids": torch.arange(past, past + new).repeat(batch, 1),
    }
    for i in range(layout["num_layers"]):
        for kv in ("key", "value"):
            shape = (batch, layout["num_kv_heads"], past, layout["head_dim"])
            inputs[f"past_key_values.{i}.{kv}"] = torch.randn(*shape, generator=g)
    return inputs


def _session(path: Path):
    import onnxruntime as ort

    options = onnx_runtime.session_options(torch.get_num_threads())  # as many threads as torch uses
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _check_vision(path: Path, vision, pixels) -> float:
    session = _session(path)
    x = torch.cat([pixels, pixels.flip(0), pixels[:1]])  # another batch size than traced
    with torch.no_grad():
        want = vision(x).numpy()
    (got,) = session.run(None, {"pixel_values": x.numpy()})
    return _compare("vision graph", [want], [got])


def _check_decoder(path: Path, step, layout: dict[str, int]) -> float:
    """Run the graph as the runtime does (first step with an empty past, then one token) and
    compare with PyTorch; batch and lengths differ from the traced ones on purpose."""
    session = _session(path)
    worst = 0.0
    for batch, past, new in ((3, 0, 7), (3, 7, 1)):
        inputs = _decoder_inputs(layout, batch=batch, past=past, new=new, seed=1)
        with torch.no_grad():
            want = [t.numpy() for t in step(*inputs.values())]
        got = session.run(None, {k: v.numpy() for k, v in inputs.items()})
        worst = max(worst, _compare("decoder graph", want, got))
    return worst


def _compare(what: str, want: list, got: list) -> float:
    """Largest difference relative to the largest magnitude (logits of a real LM reach ~30, where
    float32 kernels that sum in another order differ by ~1e-4); ``ExportError`` past ``TOLERANCE``."""
    worst = 0.0
    for a, b in zip(want, got, strict=True):
        if a.shape != b.shape:
            raise ExportError(f"the exported {what} returns {b.shape} where PyTorch gives {a.shape}")
        worst = max(worst, float(np.abs(a - b).max()) / max(1.0, float(np.abs(a).max())))
    if not worst <= TOLERANCE:
        raise ExportError(
            f"the exported {what} differs from PyTorch by {worst:.2g} (relative; tolerance {TOLERANCE})"
        )
    return worst


def _cleans_up_spaces(tokenizer) -> bool:
    """Whether ``tokenizer.decode`` applies transformers' ``clean_up_tokenization`` (which it
    skips for BPE models unless forced)."""
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return False
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and type(backend.model).__name__ == "BPE":
        return bool(
            getattr(
                tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False
            )
        )
    return True


def _warn_generation_config(lm) -> None:
    """The runtime decodes plain greedy; say so when the checkpoint asks PyTorch for more."""
    config = getattr(lm, "generation_config", None)
    if config is None:
        return
    extras = {
        k: getattr(config, k, None)
        for k in (
            "repetition_penalty",
            "no_repeat_ngram_size",
            "bad_words_ids",
            "suppress_tokens",
            "min_new_tokens",
        )
    }
    active = {k: v for k, v in extras.items() if v not in (None, 1.0, 0, [], ())}
    if active:
        log.warning(
            "the decoder's generation config sets %s; the ONNX runtime decodes plain greedy and ignores them",
            ", ".join(f"{k}={v}" for k, v in active.items()),
        )


# ------------------------------------------------------------------------------ preprocessing


def describe_preprocessing(encoder) -> dict[str, Any]:
    """The encoder's preprocessing as data for ``vlmkit.runtime.onnx.preprocess_images``.

    An encoder may declare it as an ``image_processing`` dict (that schema); otherwise it is read
    off the preprocessing callable of a ``VisionEncoderModule``: a transformers image processor,
    vlmkit's ``resize_normalize`` or a timm/torchvision transform. ``ConfigError`` otherwise.
    """
    declared = getattr(encoder, "image_processing", None)
    spec = (
        dict(declared)
        if declared is not None
        else _infer_preprocessing(getattr(encoder, "preprocess_fn", None))
    )
    name = getattr(encoder, "checkpoint", None) or type(encoder).__name__
    if spec is None:
        raise ConfigError(
            f"cannot describe the image preprocessing of encoder {name!r} for the ONNX runtime; give the encoder "
            "an 'image_processing' dict (see vlmkit.runtime.onnx.preprocess_images)"
        )
    if "input_size" not in spec:
        size = getattr(encoder, "input_size", None)
        if size is None:
            from PIL import Image

            size = tuple(encoder.preprocess([Image.new("RGB", (40, 30))]).shape[-2:])
        spec["input_size"] = [int(size[0]), int(size[1])]
    spec["input_size"] = [int(s) for s in spec["input_size"]]
    return spec


def _infer_preprocessing(fn) -> dict[str, Any] | None:
    func = getattr(fn, "func", None)
    name = getattr(func, "__name__", "")
    args, kwargs = getattr(fn, "args", ()), getattr(fn, "keywords", {}) or {}
    if name == "hf_preprocess" and args:
        return _from_hf_processor(args[0])
    if name == "resize_normalize":
        height, width = kwargs["size"]
        return {
            "resize": {
                "size": {"height": int(height), "width": int(width)},
                "resample": _resample_name(kwargs["resample"]),
                "backend": "pil",
            },
            "center_crop": None,
            "rescale_factor": float(kwargs["rescale_factor"]),
            "mean": [float(v) for v in kwargs["mean"]],
            "std": [float(v) for v in kwargs["std"]],
        }
    if args and hasattr(args[0], "transforms"):  # timm: a torchvision Compose applied to PIL images
        return _from_torchvision_transform(args[0])
    return None


def _from_hf_processor(processor) -> dict[str, Any] | None:
    p = processor
    if getattr(p, "do_pad", False):
        return None
    backend = getattr(p, "backend", None)
    if backend is None:  # transformers 4.x: "Fast" processors run on torchvision
        backend = "torchvision" if type(p).__name__.endswith("Fast") else "pil"
    resize = None
    if getattr(p, "do_resize", False):
        size = {k: v for k, v in dict(p.size).items() if v is not None}
        if set(size) == {"height", "width"}:
            size = {"height": int(size["height"]), "width": int(size["width"])}
        elif set(size) == {"shortest_edge"}:
            size = {"shortest_edge": int(size["shortest_edge"])}
        else:
            return None
        resample = _resample_name(p.resample if p.resample is not None else 2)
        resize = {"size": size, "resample": resample, "backend": backend}
    crop = None
    if getattr(p, "do_center_crop", False):
        c = dict(p.crop_size)
        crop = {"height": int(c["height"]), "width": int(c["width"]), "rounding": "floor"}
    return {
        "resize": resize,
        "center_crop": crop,
        "rescale_factor": float(p.rescale_factor) if p.do_rescale else 1.0,
        "mean": [float(v) for v in p.image_mean] if p.do_normalize else [0.0, 0.0, 0.0],
        "std": [float(v) for v in p.image_std] if p.do_normalize else [1.0, 1.0, 1.0],
    }


def _from_torchvision_transform(compose) -> dict[str, Any] | None:
    spec: dict[str, Any] = {"resize": None, "center_crop": None, "rescale_factor": 1.0}
    for t in compose.transforms:
        kind = type(t).__name__
        if kind == "Resize":
            if getattr(t, "max_size", None) is not None:
                return None
            size = t.size
            if isinstance(size, int) or len(size) == 1:
                size = {"shortest_edge": int(size if isinstance(size, int) else size[0])}
            else:
                size = {"height": int(size[0]), "width": int(size[1])}
            resample = getattr(t.interpolation, "value", t.interpolation)
            spec["resize"] = {"size": size, "resample": _resample_name(resample), "backend": "pil"}
        elif kind == "CenterCrop":
            h, w = t.size if len(t.size) == 2 else (t.size[0], t.size[0])
            spec["center_crop"] = {"height": int(h), "width": int(w), "rounding": "round"}
        elif kind in ("ToTensor", "MaybeToTensor", "PILToTensor+ToDtype"):
            spec["rescale_factor"] = 1.0 / 255.0
        elif kind == "Normalize":
            spec["mean"] = [float(v) for v in t.mean]
            spec["std"] = [float(v) for v in t.std]
        else:
            return None
    spec.setdefault("mean", [0.0, 0.0, 0.0])
    spec.setdefault("std", [1.0, 1.0, 1.0])
    return spec


def _resample_name(value) -> str:
    if isinstance(value, str):
        return value.lower()
    by_number = {v: k for k, v in onnx_runtime.RESAMPLE.items()}
    number = int(getattr(value, "value", value))
    if number not in by_number:
        raise ConfigError(f"unknown resampling filter {value!r}")
    return by_number[number]


def probe_images():
    """Deterministic RGB images of awkward sizes (noise, gradients): preprocessing is checked on them."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for h, w in ((40, 56), (97, 61), (300, 257), (23, 31)):
        noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ramp = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
        images.append(Image.fromarray(((noise * 0.5) + ramp * 0.5).astype(np.uint8)))
    return images


def _check_preprocessing(encoder, spec: dict[str, Any]) -> float:
    worst = 0.0
    for image in probe_images():  # one by one: encoders may batch only same-size images
        want = encoder.preprocess([image]).float().numpy()
        got = onnx_runtime.preprocess_images([image], spec)
        if got.shape != want.shape:
            raise ConfigError(
                f"the ONNX runtime's preprocessing makes {got.shape[1:]} pixels, the encoder {want.shape[1:]}; "
                "fix the encoder's 'image_processing'"
            )
        worst = max(worst, float(np.abs(got - want).max()))
    if worst > PREPROCESSING_TOLERANCE:
        raise ConfigError(
            f"the ONNX runtime cannot reproduce this encoder's preprocessing (pixels differ by up to {worst:.3g}); "
            "give the encoder an 'image_processing' dict that describes it exactly"
        )
    return worst


# ------------------------------------------------------------------------------ merged HF weights


def _export_hf(vlm, folder: Path, *, source, on_step) -> dict[str, Any]:
    from safetensors.torch import save_file

    _step(on_step, "merging LoRA into a copy of the decoder")
    lm = merged_decoder(vlm)
    _step(on_step, "saving the merged decoder (transformers format)")
    lm.save_pretrained(str(folder / "decoder"))
    vlm.tokenizer.save_pretrained(str(folder / "decoder"))
    save_file(_state(vlm.projection), str(folder / "projection.safetensors"))
    files = {"decoder": "decoder", "projection": "projection.safetensors", "encoder": None}
    encoder_weights = vlm.encoder_weights()  # trained encoder layers, even in a model loaded frozen
    if encoder_weights:
        save_file(encoder_weights, str(folder / "encoder.safetensors"))
        files["encoder"] = "encoder.safetensors"
    base_manifest = vlm.manifest()
    formatted = vlm.format(None)
    manifest = {
        "format": HF_FORMAT,
        "format_version": HF_FORMAT_VERSION,
        "vlmkit_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": source or {},
        "config": base_manifest["config"],
        "encoder": base_manifest["encoder"],
        "decoder": {**base_manifest["decoder"], "merged": "decoder"},
        "prefix_tokens": vlm.num_prefix_tokens,
        "stop_token_ids": list(vlm.stop_token_ids),
        "tokens": {
            "before": list(formatted.before),
            "after": list(formatted.after),
            "pad_id": int(vlm.pad_token_id),
        },
        "files": files,
    }
    (folder / HF_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return {}


def read_hf_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a ``--format hf`` export; ``ArtifactError`` when ``path`` is not one."""
    path = Path(path)
    file = path / HF_MANIFEST
    if not file.is_file():
        raise ArtifactError(
            f"{path} is not a vlmkit merged export (no {HF_MANIFEST}); make one with 'vlmkit export --format hf'"
        )
    manifest = read_json_manifest(file, "vlmkit merged-export manifest")
    if manifest.get("format") != HF_FORMAT or manifest.get("format_version", 0) > HF_FORMAT_VERSION:
        raise ArtifactError(f"{file} is not a manifest this vlmkit reads")
    return manifest


def load_hf_export(path: str | Path, *, registry=None):
    """A ``PrefixConditioningVLM`` from a ``--format hf`` export: the encoder through its plugin, the
    merged decoder from ``decoder/`` (no LoRA, no peft), the saved projection. For inference."""
    from safetensors.torch import load_file

    from vlmkit.core.model import PrefixConditioningVLM, _validate_config
    from vlmkit.core.projection import build_projection
    from vlmkit.core.registry import get_registry

    path = Path(path)
    manifest = read_hf_manifest(path)
    config = _validate_config(
        {**manifest["config"], "decoder_checkpoint": str(path / "decoder"), "decoder_revision": None},
        source=str(path / HF_MANIFEST),
    )
    registry = registry or get_registry()
    encoder_spec, decoder_spec = registry.encoder(config.encoder), registry.decoder(config.decoder)
    encoder = encoder_spec.load(config.encoder_checkpoint, revision=config.encoder_revision)
    base, tokenizer = decoder_spec.load(str(path / "decoder"))
    projection = build_projection(
        config.projection, encoder.feature_dim, base.get_input_embeddings().embedding_dim, encoder.grid
    )
    projection.load_state_dict(load_file(str(path / manifest["files"]["projection"])))
    model = PrefixConditioningVLM(
        config, encoder, encoder_spec, decoder_spec, MergedLM(base), tokenizer, projection
    )
    model.freeze_encoder(0)
    if manifest["files"].get("encoder"):
        encoder.load_state_dict(load_file(str(path / manifest["files"]["encoder"])), strict=False)
    model.requires_grad_(False)
    return model.eval()


class MergedLM(nn.Module):
    """The peft-model methods ``PrefixConditioningVLM`` calls, over a merged (plain) causal LM."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def get_base_model(self):
        return self.model

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def save_pretrained(self, *args, **kwargs):
        raise ArtifactError("a merged export has no LoRA adapter to save; train from the original model")


def _state(module) -> dict:
    return {k: v.detach().contiguous() for k, v in module.state_dict().items()}


__all__: Sequence[str] = (
    "DEFAULT_OPSET",
    "FORMATS",
    "MIN_OPSET",
    "ExportError",
    "ExportResult",
    "check_options",
    "describe_preprocessing",
    "export_model",
    "export_vlm",
    "load_hf_export",
    "max_opset",
    "merged_decoder",
    "quantize_int8",
    "read_hf_manifest",
)
