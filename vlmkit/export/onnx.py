"""``vlmkit export --format onnx``: ONNX graphs for ONNX Runtime, checked against PyTorch.

``--format onnx`` writes what ``vlmkit.runtime.onnx.OnnxCaptioner`` runs without torch (see that
module for the folder layout):

- ``vision.onnx``: encoder + projection (token reduction included), pixels -> prefix embeddings.
- ``decoder.onnx``: the LM with its LoRA merged (on a copy), one generation step with a key/value
  cache. It takes ``inputs_embeds`` rather than token ids so that the runtime can splice the image
  prefix in, and the token-embedding table travels as ``embed_tokens.npy``. The same graph serves
  the first step (past length 0) and every later one (one token each).
- ``vlmkit-onnx.json``: the graphs' inputs/outputs, the past key/value layout, the prompt's token
  ids as the decoder plugin formats them, stop/pad ids, and the encoder's preprocessing as data.
- ``--quantize int8|int4``: ``*.int8.onnx`` or ``*.int4.onnx`` next to the float32 graphs, with
  the MatMul/Gemm weights quantized by ONNX Runtime's ``MatMulNBitsQuantizer`` (``vlmkit.export.quantize``).

Export uses torch's TorchScript-based ONNX exporter (``dynamo=False``): it exports the
``DynamicCache`` path of every built-in decoder family (Llama, Qwen2, Phi, Phi-3, GPT-2) with
dynamic batch and sequence axes, and needs no extra package. Every export is checked: the
graphs are run once with ONNX Runtime against PyTorch, and the runtime's numpy preprocessing
against the encoder plugin's own, before the folder is published. A quantized export also
captions a few drawn images (``agreement_images``) with the fp32 and the quantized graphs and
records how many captions are identical (``checks.caption_agreement`` in the manifest), warning in
one line under ``vlmkit.export.quantize.AGREEMENT_THRESHOLD``.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import inspect
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vlmkit.core import __version__
from vlmkit.core.contracts import RESAMPLE
from vlmkit.core.errors import ConfigError, ExportError, VlmkitError
from vlmkit.export.steps import step
from vlmkit.runtime import onnx as onnx_runtime

log = logging.getLogger(__name__)

#: how far the ONNX graphs may drift from PyTorch (float32, relative to the largest output value)
#: before the export is refused
TOLERANCE = 1e-4
#: how far the runtime's preprocessing may differ from the encoder plugin's (pixel values)
PREPROCESSING_TOLERANCE = 1e-4


def write_onnx(vlm, folder: Path, *, opset: int, quantize: str | None, source, on_step) -> dict[str, Any]:
    """Write the ONNX export of ``vlm`` into ``folder``; returns the checks it passed."""
    checks: dict[str, Any] = {}
    step(on_step, "checking that the decoder's architecture exports")
    layout = decoder_layout(vlm.language_model, vlm.settings.decoder)  # refused here, before any work
    step(on_step, "describing the image preprocessing")
    preprocessing = describe_preprocessing(vlm.encoder)
    checks["preprocessing_max_abs_diff"] = _check_preprocessing(vlm.encoder, preprocessing)

    step(on_step, "exporting the vision graph (encoder + projection)")
    vision = VisionGraph(vlm.encoder, vlm.projection).eval()
    pixels = vlm.preprocess(probe_images()[:2]).float()
    export_vision_graph(vision, pixels, folder / "vision.onnx", opset=opset)

    step(on_step, "merging LoRA into a copy of the decoder")
    lm = merged_decoder(vlm)
    decoder_step = DecoderStep(lm, layout["num_layers"]).eval()
    names = [f"{i}.{kv}" for i in range(layout["num_layers"]) for kv in ("key", "value")]
    past_in, present_out = [f"past_key_values.{n}" for n in names], [f"present.{n}" for n in names]
    step(on_step, "exporting the decoder graph (with key/value cache)")
    # Traced with a non-empty past and several new tokens, so that no shape is a constant 0 or 1.
    dummy = _decoder_inputs(layout, batch=2, past=2, new=3, seed=0)
    _onnx_export(
        decoder_step,
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
    embed = embedding_table(lm)
    if vlm.embedding_scale != 1.0:  # what the LM does to token embeddings on its token-id path only
        embed = embed * np.float32(vlm.embedding_scale)
    np.save(folder / "embed_tokens.npy", embed)

    step(on_step, "saving the tokenizer")
    tokenizer = vlm.tokenizer
    if not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ExportError(
            "ONNX export needs a fast tokenizer (tokenizer.json); this decoder's tokenizer is not one"
        )
    tokenizer.save_pretrained(str(folder))

    step(on_step, "checking the graphs against PyTorch")
    checks["vision_max_rel_diff"] = check_vision_graph(folder / "vision.onnx", vision, pixels)
    checks["decoder_max_rel_diff"] = _check_decoder(folder / "decoder.onnx", decoder_step, layout)

    variants: dict[str, Any] = {"fp32": {"vision": "vision.onnx", "decoder": "decoder.onnx"}}
    if quantize is not None:
        from vlmkit.export.quantize import CPU_SCHEME, quantize_graphs

        scheme = CPU_SCHEME[quantize]
        entry = quantize_graphs(
            folder,
            variants["fp32"],
            quantize,
            parts=("decoder",),
            block_size=scheme.block_size,
            accuracy_level=scheme.accuracy_level,
            float_width=int(embed.shape[0]) if scheme.float_lm_head else None,
            on_step=on_step,
        )
        # the image and the prompt pass run the fp32 graphs, each generated token the quantized one
        # (the prompt pass decides the first word and the cache every step reads: vlmkit.export.quantize)
        fp32 = variants["fp32"]
        variants[quantize] = {"vision": fp32["vision"], "prompt_decoder": fp32["decoder"], **entry}

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
        "default_variant": quantize or "fp32",
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
            "style": vlm.settings.prompt_format,
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
    step(on_step, "teacher-forcing real captions through the runtime against PyTorch")
    checks["teacher_forced_max_rel_diff"] = check_teacher_forced(vlm, folder)  # in the manifest's dict
    if quantize is not None:  # logits that agree to 1e-2 can still flip a near-tie and a caption
        from vlmkit.export.quantize import caption_agreement

        images = agreement_images()
        step(on_step, f"captioning {len(images)} sample images with the fp32 and the {quantize} graphs")
        checks["caption_agreement"] = caption_agreement(
            folder, quantize, images, threads=torch.get_num_threads()
        )
    (folder / onnx_runtime.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return checks


#: captions teacher-forced through the export: real ids go through ``embed_tokens.npy`` and the
#: prompt the runtime assembles, which the random ``inputs_embeds`` of the graph check never do
TEACHER_FORCED = ("A red circle on the left.", "Two dogs play in the snow near a small wooden house.")


def check_teacher_forced(vlm, folder: Path) -> float:
    """The runtime's logits before each target token (caption + end token), fed the real ids, equal
    PyTorch's from the model's own forward; ``ExportError`` past ``TOLERANCE``. Catches what a
    family does to token embeddings (Gemma scales them inside its embedding module) or to long
    sequences (sliding windows) that the export failed to carry over."""
    from vlmkit.core.model import IGNORE_INDEX

    runtime = onnx_runtime.OnnxCaptioner(folder, variant="fp32", threads=torch.get_num_threads())
    pixels = vlm.preprocess(probe_images()[: len(TEACHER_FORCED)]).float()
    batch = vlm.tokenize(list(TEACHER_FORCED))
    with torch.no_grad():
        logits = vlm(**batch.to_dict(), pixel_values=pixels, return_logits=True)["logits"].float()
    want, targets = [], []
    for row in range(len(TEACHER_FORCED)):
        at = (batch.labels[row] != IGNORE_INDEX).nonzero().squeeze(1)
        targets.append(batch.input_ids[row, at].tolist())
        want.append(logits[row, at - 1].numpy())  # the position before a token predicts it
    got = runtime.teacher_forced_logits(pixels.numpy(), targets)
    return _compare("decoder, teacher-forced on real caption ids through embed_tokens.npy,", want, got)


def merged_decoder(vlm):
    """A float32 copy of the decoder with its LoRA merged into the base weights (no peft left)."""
    lm = copy.deepcopy(vlm.lm)
    merged = lm.merge_and_unload() if hasattr(lm, "merge_and_unload") else lm
    merged = merged.float().eval()
    merged.requires_grad_(False)
    return merged


def embedding_table(lm, chunk: int = 8192) -> np.ndarray:
    """``[V, D]``: the LM's input-embedding *module* run over every token id, not its weight:
    families scale inside the module (Gemma multiplies by sqrt(hidden_size)), and the runtimes
    (Python, browser) look ids up in this table where PyTorch calls the module. The export
    multiplies it by the model's ``embedding_scale`` (Falcon-H1's ``embedding_multiplier``)."""
    module = lm.get_input_embeddings()
    vocab = module.weight.shape[0]
    with torch.no_grad():
        rows = [
            module(torch.arange(i, min(i + chunk, vocab))).float().numpy() for i in range(0, vocab, chunk)
        ]
    return np.ascontiguousarray(np.concatenate(rows))


def _onnx_export(module, args, path: Path, *, opset: int, what: str, **kwargs) -> None:
    """``torch.onnx.export``, its output (TorchScript graph dumps, hundreds of lines on failure)
    written to a log file rather than the terminal: removed after a success, named in the
    one-line ``ExportError`` of a failure."""
    handle, name = tempfile.mkstemp(prefix="vlmkit-onnx-export-", suffix=".log")
    log_path = Path(name)
    try:
        with (
            os.fdopen(handle, "w") as log_file,
            _output_to(log_file),
            _quiet_export(),
            _export_friendly_ops(),
            torch.no_grad(),
        ):
            torch.onnx.export(module, args, str(path), opset_version=opset, dynamo=False, **kwargs)
    except VlmkitError:
        raise
    except Exception as exc:  # noqa: BLE001 - exporter errors come in every type; report one line
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ExportError(
            f"ONNX export of the {what} failed (opset {opset}): {first[:300]} (the exporter's output: {log_path})"
        ) from exc
    log_path.unlink(missing_ok=True)


@contextlib.contextmanager
def _output_to(log_file) -> Iterator[None]:
    """Everything written to stdout and stderr, by Python or by torch's C++ (the exporter prints
    its TorchScript graph there when it fails), goes to ``log_file`` instead."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    os.dup2(log_file.fileno(), 1)
    os.dup2(log_file.fileno(), 2)
    try:
        with contextlib.redirect_stdout(log_file), contextlib.redirect_stderr(log_file):
            yield
    finally:
        _flush_c_stdio()
        log_file.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def _flush_c_stdio() -> None:
    """C's stdio buffers what C++ prints while stdout is a file; flushed into the log, not later."""
    with contextlib.suppress(OSError, AttributeError, TypeError):  # no C library to call (Windows)
        ctypes.CDLL(None).fflush(None)


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
def _export_friendly_ops() -> Iterator[None]:
    with _export_friendly_adaptive_pooling(), _export_friendly_repeat_interleave():
        yield


@contextlib.contextmanager
def _export_friendly_repeat_interleave() -> Iterator[None]:
    """The TorchScript exporter's ``repeat_interleave`` over a dynamic axis builds a Concat of
    inputs of different ranks ("All tensors must have the same rank"): Cohere's interleaved
    rotary embedding (``repeat_interleave(freqs, 2, dim=-1)``) failed so. While exporting, a
    repeat by an integer along one axis is the same values as unsqueeze, expand and flatten."""
    original_function, original_method = torch.repeat_interleave, torch.Tensor.repeat_interleave

    def repeat_interleave(x, repeats, dim=None, *, output_size=None):
        if isinstance(x, torch.Tensor) and isinstance(repeats, int) and dim is not None:
            d = dim % x.dim()
            return x.unsqueeze(d + 1).expand(*x.shape[: d + 1], repeats, *x.shape[d + 1 :]).flatten(d, d + 1)
        return original_function(x, repeats, dim, output_size=output_size)

    torch.repeat_interleave = repeat_interleave
    torch.Tensor.repeat_interleave = repeat_interleave
    try:
        yield
    finally:
        torch.repeat_interleave = original_function
        torch.Tensor.repeat_interleave = original_method


@contextlib.contextmanager
def _export_friendly_adaptive_pooling() -> Iterator[None]:
    """ONNX has no adaptive average pooling; torch exports it only when the output size divides an
    input size it can see (a 7x7 grid pooled to 4x4 does not; nor does a map whose size the graph
    computes, as after TF "same" padding). While exporting, an encoder's own adaptive pooling is
    ``vlmkit.core.projection.adaptive_avg_pool``: an average pool of a fixed kernel where the sizes
    divide, and otherwise the same averages written as two small matrix products."""
    from vlmkit.core.projection import adaptive_avg_pool

    original = torch.nn.functional.adaptive_avg_pool2d

    def pool(x, output_size):
        rows, cols = (int(n) for n in x.shape[-2:])
        out_r, out_c = (output_size, output_size) if isinstance(output_size, int) else output_size
        return adaptive_avg_pool(x, (int(out_r or rows), int(out_c or cols)))

    torch.nn.functional.adaptive_avg_pool2d = pool
    try:
        yield
    finally:
        torch.nn.functional.adaptive_avg_pool2d = original


def export_vision_graph(vision: nn.Module, pixels, path: Path, *, opset: int) -> None:
    """Write ``vision`` (pixels -> embeddings, e.g. a ``VisionGraph``) to ``path``, traced on
    ``pixels``, with a dynamic batch axis; ``check_vision_graph`` compares it with PyTorch."""
    _onnx_export(
        vision,
        (pixels,),
        path,
        opset=opset,
        input_names=["pixel_values"],
        output_names=["prefix_embeds"],
        dynamic_axes={"pixel_values": {0: "batch"}, "prefix_embeds": {0: "batch"}},
        what="vision graph",
    )


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
    """A cache that keeps every key/value, windowed layers too: the runtimes keep one attention
    mask and one past length for all layers. The window itself is applied by the attention mask
    transformers builds from the model's config (``sliding_window``), as in PyTorch generation,
    where a windowed layer's cache drops what its window no longer sees."""
    from transformers import DynamicCache

    try:
        return DynamicCache(ddp_cache_data=pairs)
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


#: the cache layers the decoder graph carries, by class name (exactly: a hybrid layer that
#: subclasses one, as Falcon-H1's does to add its Mamba state, is not one of them)
KV_CACHE_LAYERS = {
    "DynamicLayer": "keys and values of every past position",
    "DynamicSlidingWindowLayer": "keys and values of a sliding window (the graph keeps them all; the "
    "attention mask applies the window)",
}


def decoder_layout(lm, decoder: str = "?") -> dict[str, int]:
    """Layers, key/value heads and head size, read off one forward pass (no config guessing), once
    the decoder is known to export: every layer's cache is one of ``KV_CACHE_LAYERS``. Anything else
    (Mamba's recurrent state, a hybrid's) is one ``ExportError`` naming the family and what is
    missing, before any graph is traced."""
    dim = lm.get_input_embeddings().embedding_dim
    family = f"decoder {decoder!r} ({type(lm).__name__}, model_type {lm.config.model_type!r})"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = lm(inputs_embeds=torch.zeros(1, 2, dim), use_cache=True)
    cache = _output_cache(out)
    num_layers = lm.config.get_text_config().num_hidden_layers
    if cache is None:
        raise ExportError(
            f"ONNX export: {family} returns no cache from its forward; the decoder graph needs a key/value "
            "cache. Export with --format hf, or caption in PyTorch"
        )
    if not hasattr(cache, "layers") and not hasattr(cache, "to_legacy_cache"):  # neither 5.x nor 4.x
        raise ExportError(
            f"ONNX export: {family} returns a {type(cache).__name__} cache, not one of keys and values per layer; "
            "the ONNX decoder graph carries keys and values only. Export with --format hf, or caption in PyTorch"
        )
    kinds = [type(layer).__name__ for layer in getattr(cache, "layers", ())]  # none: transformers 4.x
    unknown = sorted({k for k in kinds if k not in KV_CACHE_LAYERS})
    if unknown:
        where = [i for i, k in enumerate(kinds) if k not in KV_CACHE_LAYERS]
        raise ExportError(
            f"ONNX export: {family} keeps {', '.join(unknown)} state in {len(where)} of its {len(kinds)} "
            f"layers, not a key/value cache; the ONNX decoder graph carries keys and values only "
            f"({', '.join(KV_CACHE_LAYERS)}). Export with --format hf, or caption in PyTorch"
        )
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


def check_vision_graph(path: Path, vision, pixels) -> float:
    """The exported vision graph on ``pixels`` (another batch size than traced) against PyTorch:
    the largest relative difference; ``ExportError`` past ``TOLERANCE``."""
    session = _session(path)
    x = torch.cat([pixels, pixels.flip(0), pixels[:1]])  # another batch size than traced
    with torch.no_grad():
        want = vision(x).numpy()
    try:
        (got,) = session.run(None, {"pixel_values": x.numpy()})
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's errors: one line, saying what it means
        first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise ExportError(
            f"the exported vision graph fails on a batch of {len(x)} images, another size than traced: the "
            f"encoder's forward fixes the batch size somewhere (a tensor built per image?): {first[:300]}"
        ) from exc
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
    """The encoder's declared preprocessing (``VisionEncoder.image_processing``) for
    ``vlmkit.runtime.onnx.preprocess_images``; ``ConfigError`` when it declares none."""
    declared = getattr(encoder, "image_processing", None)
    if declared is None:
        raise ConfigError(
            f"encoder {type(encoder).__name__} declares no image_processing, so the ONNX runtime cannot "
            "reproduce its preprocessing; declare it (see vlmkit.VisionEncoder.image_processing)"
        )
    spec = json.loads(json.dumps(dict(declared)))
    _check_declared(spec, type(encoder).__name__)
    spec["input_size"] = [int(s) for s in spec["input_size"]]
    return spec


#: the keys a declared preprocessing must have (``vlmkit.VisionEncoder.image_processing``), by part
DECLARED_KEYS = {
    None: ("input_size", "rescale_factor", "mean", "std"),
    "resize": ("size", "resample"),
    "center_crop": ("height", "width"),
}


def _check_declared(spec: dict[str, Any], encoder: str) -> None:
    """A malformed declaration is one ``ConfigError`` naming the part and key, not a ``KeyError``
    in the runtime."""
    for part, keys in DECLARED_KEYS.items():
        given = spec if part is None else spec.get(part)
        where = "image_processing" + ("" if part is None else f"[{part!r}]")
        if given is None and part is not None:
            continue  # no resize, no crop
        if not isinstance(given, dict):
            raise ConfigError(f"encoder {encoder}: {where} must be a dict or None, got {given!r}")
        missing = [k for k in keys if k not in given]
        if missing:
            raise ConfigError(
                f"encoder {encoder}: {where} lacks {', '.join(missing)} (see vlmkit.VisionEncoder)"
            )
    resample = (spec.get("resize") or {}).get("resample", "bicubic")
    if resample not in RESAMPLE:
        raise ConfigError(
            f"encoder {encoder}: unknown resample {resample!r}; use one of {', '.join(RESAMPLE)}"
        )


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


def agreement_images(n: int = 12):
    """``n`` deterministic RGB images for the export's caption-agreement check: one to three filled
    shapes (ellipse, box, triangle) in saturated colours on white, tinted or noisy backgrounds, of
    several sizes. Drawn rather than read, because the export runs with nothing but the model (its
    training data may be a download away); and pictures of objects rather than the noise of
    ``probe_images``, on which a trained captioner's next-token margins are so thin that any change
    of the arithmetic flips them, which is not what the check is for."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    colours = [(220, 30, 30), (30, 90, 220), (40, 170, 60), (240, 200, 20), (150, 50, 180), (250, 130, 20)]
    images = []
    for i in range(n):
        width, height = (64, 64) if i % 3 == 0 else (int(rng.integers(48, 320)), int(rng.integers(48, 320)))
        if i % 4 == 3:  # a noisy grey background
            pixels = rng.integers(90, 170, (height, width, 1), dtype=np.uint8).repeat(3, axis=2)
            image = Image.fromarray(pixels)
        else:
            image = Image.new("RGB", (width, height), (255, 255, 255) if i % 2 == 0 else (235, 225, 200))
        draw = ImageDraw.Draw(image)
        for k in range(1 + i % 3):
            side = int(min(width, height) * rng.uniform(0.25, 0.5))
            x, y = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
            colour = colours[(i + 2 * k) % len(colours)]
            kind = (i + k) % 3
            if kind == 0:
                draw.ellipse((x, y, x + side, y + side), fill=colour)
            elif kind == 1:
                draw.rectangle((x, y, x + side, y + side), fill=colour)
            else:
                draw.polygon([(x + side // 2, y), (x, y + side), (x + side, y + side)], fill=colour)
        images.append(image)
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
