"""Weight quantization of ONNX graphs with ONNX Runtime's own quantizer, and the check that the
quantized graphs still caption as the fp32 ones do.

``MatMulNBitsQuantizer`` (``onnxruntime.quantization.matmul_nbits_quantizer``) rewrites every
``MatMul`` by a constant float weight as ``com.microsoft.MatMulNBits``: the weight in blocks of
``block_size`` inputs, 4 or 8 bits each, symmetric, with a float scale per block. The graphs' inputs
and outputs stay float, so the runtimes feed the same inputs to every variant. ONNX Runtime runs
``MatMulNBits`` on the CPU and in onnxruntime-web (wasm and WebGPU), which is why it is the one
format we write. The quantizer knows ``MatMul`` only; ``Gemm`` by a constant weight (GPT-2's
``Conv1D`` exports as one) is first rewritten as ``MatMul`` + ``Add``, the same product.
``accuracy_level`` (MatMulNBits' attribute) unset keeps activations float; 4 quantizes them to int8
per block at run time, which is what makes ONNX Runtime's CPU kernel fast (int8 x int8).

Two schemes, each registered in the manifest with its method, bits, block size and accuracy level:

- ``--format web`` (``BLOCK_SIZE``, float activations): the browser's wasm kernels then compute
  what the CPU kernels compute, and its captions equal Python's.
- ``--format onnx --quantize int8`` (``CPU_SCHEME``), for speed on a CPU: the decoder graph only,
  8-bit weights in blocks of 32, int8 activations, the LM head kept float; the runtime runs the
  image and the prompt pass on the fp32 graphs (``prompt_decoder``, ``vlmkit.runtime.onnx``) and
  each generated token on the int8 graph.

Why (the demo's scenes model, EfficientNet-Lite0 + SmolLM2-135M, benchmarks/RESULTS.md "int8
captions"): ONNX Runtime's int8 (block 128, level 4, every graph) kept 27 of 32 benchmark captions.
The logits' error was ~1.5 (max over the vocabulary, median over positions), and this model's
captions have near-ties far smaller: a third of them have a step where the top two logits are
within 0.1, mostly the first word ("A ..." or "There is ...", the dataset's two phrasings at
50/50). Two causes, measured by simulating each choice in PyTorch: activation quantization, because
SmolLM2's activations have channels up to 8,000 times the median (the MLP's down_proj input;
30 times in the attention input), and one int8 scale per block of 128 then zeroes the rest of the
block; and the 8-bit weights themselves, whose error is spread over all 30 layers (no layer group,
not even the LM head, holds more than half of it: keeping any one float leaves ~0.6 of ~0.7).
12-bit weights would be needed to keep every caption; no block size or layer choice gets int8 there.
What works: blocks of 32 (smaller errors from both causes), the LM head float (its error goes
straight into the logits), and the prompt pass in fp32, which decides the first word and computes
the key/value cache every later step reads: 155 of 156 captions identical, where the prompt pass in
int8 kept 25 of 32. The prompt pass is one decoder run of ~10 per caption, and a ``--format onnx``
folder holds the fp32 graphs anyway.

``caption_agreement`` measures it at every quantized export: it captions a few images with the fp32
and the quantized graphs and records how many captions are identical, warning under
``AGREEMENT_THRESHOLD``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmkit.core.errors import ArtifactError, ConfigError, VlmkitWarning

log = logging.getLogger(__name__)

#: variant name -> bits per weight
WEIGHT_BITS = {"int8": 8, "int4": 4}
#: the web export's blocks: ONNX Runtime's default for int8; 32 for int4, whose coarser steps need
#: smaller blocks
BLOCK_SIZE = {"int8": 128, "int4": 32}


@dataclass(frozen=True)
class Scheme:
    """How ``--format onnx`` quantizes a variant for the Python runtime on a CPU."""

    block_size: int
    accuracy_level: int | None = None
    float_lm_head: bool = False  # the product whose weight has the vocabulary's width stays float


#: ``--format onnx``: int8 for speed (int8 activations), with what keeps its captions (see above);
#: int4 as the web export writes it
CPU_SCHEME = {"int8": Scheme(32, accuracy_level=4, float_lm_head=True), "int4": Scheme(32)}


@dataclass
class QuantizedGraph:
    """One quantized graph: where it went, how many MatMuls became MatMulNBits, which stayed float
    on purpose, bytes before/after."""

    path: Path
    quantized_nodes: int
    bytes_before: int
    bytes_after: int
    kept_float: list[str]


def quantize_graph(
    source: str | Path,
    target: str | Path,
    variant: str,
    *,
    block_size: int | None = None,
    accuracy_level: int | None = None,
    float_width: int | None = None,
) -> QuantizedGraph:
    """Write ``target``: the graph ``source`` with its constant ``MatMul``/``Gemm`` weights quantized
    to ``variant`` (``int8`` or ``int4``) by ``MatMulNBitsQuantizer``, except those with
    ``float_width`` output columns (the vocabulary's: the LM head), which stay float."""
    import onnx

    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as exc:  # it imports onnx_ir, which onnxruntime does not depend on
        raise ConfigError(
            f"quantizing needs onnxruntime's MatMulNBitsQuantizer ({exc}); pip install 'vlmkit[quantize]'"
        ) from None

    if variant not in WEIGHT_BITS:
        raise ConfigError(f"unknown quantization {variant!r}; supported: {', '.join(WEIGHT_BITS)}")
    source, target = Path(source), Path(target)
    if not source.is_file():
        raise ArtifactError(f"cannot quantize {source}: no such file")
    model = onnx.load(str(source))
    _gemm_as_matmul(model)
    kept = _products_of_width(model, float_width) if float_width else []
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=WEIGHT_BITS[variant],
        block_size=block_size or BLOCK_SIZE[variant],
        is_symmetric=True,
        accuracy_level=accuracy_level,
        nodes_to_exclude=kept,
        op_types_to_quantize=("MatMul",),
    )
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)  # the quantizer logs every node at INFO on the root logger
    try:
        quantizer.process()
    finally:
        root.setLevel(level)
    quantized = sum(1 for n in quantizer.model.model.graph.node if n.op_type == "MatMulNBits")
    if quantized == 0:
        log.warning(
            "%s: no MatMul has a constant float weight; %s is not quantized", source.name, target.name
        )
    quantizer.model.save_model_to_file(str(target), use_external_data_format=False)
    return QuantizedGraph(target, quantized, source.stat().st_size, target.stat().st_size, kept)


def quantize_graphs(
    folder: Path,
    graphs: dict[str, str],
    variant: str,
    *,
    target: Path | None = None,
    parts: Sequence[str] = ("vision", "decoder"),
    block_size: int | None = None,
    accuracy_level: int | None = None,
    float_width: int | None = None,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Quantize the ``parts`` of the graphs ``{"vision": file, "decoder": file}`` of ``folder`` to
    ``<part>.<variant>.onnx`` in ``target`` (default: ``folder``); returns the manifest's entry
    for the variant (the parts' files, the method and its settings)."""
    from vlmkit.export.steps import step

    target = folder if target is None else target
    block = block_size or BLOCK_SIZE[variant]
    entry: dict[str, Any] = {}
    kept: list[str] = []
    for part in parts:
        step(on_step, f"quantizing the {part} graph to {variant} (MatMulNBits, block {block})")
        done = quantize_graph(
            folder / graphs[part],
            target / f"{part}.{variant}.onnx",
            variant,
            block_size=block,
            accuracy_level=accuracy_level,
            float_width=float_width,
        )
        entry[part] = done.path.name
        kept += done.kept_float
    entry.update(
        method="onnxruntime MatMulNBitsQuantizer",
        bits=WEIGHT_BITS[variant],
        block_size=block,
        accuracy_level=accuracy_level,
    )
    if float_width:
        entry["kept_float"] = kept
    return entry


def _products_of_width(model, width: int) -> list[str]:
    """The ``MatMul`` nodes whose constant 2-D weight has ``width`` columns."""
    sizes = {t.name: list(t.dims) for t in model.graph.initializer}
    found = []
    for i, node in enumerate(model.graph.node):
        weight = sizes.get(node.input[1], ()) if node.op_type == "MatMul" else ()
        if len(weight) == 2 and weight[1] == width:
            node.name = node.name or f"float_product_{i}"  # the quantizer excludes nodes by name
            found.append(node.name)
    return found


#: the export warns (one line) when fewer of its sample captions than this share are the same
#: with the quantized graphs as with the fp32 ones
AGREEMENT_THRESHOLD = 0.9


class QuantizationWarning(VlmkitWarning):
    """The quantized graphs caption the export's sample images differently from the fp32 ones."""


def caption_agreement(
    folder: Path, variant: str, images: Sequence[Any], *, threads: int | None = None
) -> dict[str, Any]:
    """Greedy captions of ``images`` with the export's ``fp32`` graphs and its ``variant`` ones
    (the runtime's own generation, the manifest's token limit): how many are token for token the
    same. Logits checks miss what this catches: a small error that flips one near-tie, after which
    the rest of the caption differs. Warns (``QuantizationWarning``, one line) under
    ``AGREEMENT_THRESHOLD``; returns the manifest's entry."""
    from vlmkit.runtime.onnx import OnnxCaptioner

    fp32 = OnnxCaptioner(folder, variant="fp32", threads=threads)
    quantized = OnnxCaptioner(folder, variant=variant, threads=threads)
    pixels = fp32.preprocess(images)
    want = fp32.generate(pixel_values=pixels, return_ids=True)
    got = quantized.generate(pixel_values=pixels, return_ids=True)
    differ = [i for i, (a, b) in enumerate(zip(want, got, strict=True)) if a != b]
    entry = {
        "variant": variant,
        "vs": "fp32",
        "images": len(images),
        "identical": len(images) - len(differ),
        "threshold": AGREEMENT_THRESHOLD,
    }
    if entry["identical"] < AGREEMENT_THRESHOLD * len(images):
        first = differ[0]
        warnings.warn(
            f"the {variant} graphs caption only {entry['identical']} of {len(images)} sample images as the "
            f"fp32 graphs do (e.g. {fp32.decode(want[first])!r} -> {quantized.decode(got[first])!r}): its "
            f"captions may not be the model's; export without --quantize for the fp32 graphs alone",
            QuantizationWarning,
            stacklevel=2,
        )
    return entry


def _gemm_as_matmul(model) -> None:
    """Rewrite, in place, ``Gemm(x, W[, C])`` by a constant float ``W`` (alpha = beta = 1, x not
    transposed) as ``MatMul(x, W)`` (+ ``Add(C)``), so that the quantizer, which knows ``MatMul``
    only, quantizes it too."""
    import onnx
    from onnx import helper, numpy_helper

    weights = {t.name: t for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        w = weights.get(node.input[1]) if node.op_type == "Gemm" and len(node.input) > 1 else None
        plain = (
            not attrs.get("transA", 0) and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
        )
        if w is None or not plain or len(w.dims) != 2 or w.data_type != onnx.TensorProto.FLOAT:
            nodes.append(node)
            continue
        name = w.name
        if attrs.get("transB", 0):  # a transposed copy; the original goes if nothing else reads it
            name = f"{w.name}.T"
            if name not in weights:
                weights[name] = numpy_helper.from_array(numpy_helper.to_array(w).T.copy(), name)
                model.graph.initializer.append(weights[name])
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        product = f"{node.output[0]}.matmul" if bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], name], [product], name=f"{node.name}.matmul"))
        if bias:
            nodes.append(
                helper.make_node("Add", [product, bias], list(node.output), name=f"{node.name}.bias")
            )
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    transposed = {
        n.input[1].removesuffix(".T") for n in nodes if n.op_type == "MatMul" and n.input[1].endswith(".T")
    }
    used = {o.name for o in model.graph.output} | set(_inputs_read(model.graph))
    kept = [t for t in model.graph.initializer if t.name not in transposed or t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def _inputs_read(graph):
    """Every tensor name the nodes of ``graph`` read, subgraphs (If/Loop bodies) included."""
    from onnx import AttributeProto

    for node in graph.node:
        yield from node.input
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                yield from _inputs_read(attr.g)
            elif attr.type == AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _inputs_read(g)
