"""Weight-only quantization of ONNX graphs with ONNX Runtime's own quantizer.

``MatMulNBitsQuantizer`` (``onnxruntime.quantization.matmul_nbits_quantizer``) rewrites every
``MatMul`` by a constant float weight as ``com.microsoft.MatMulNBits``: the weight in blocks of
``block_size`` inputs, 4 or 8 bits each, symmetric, with a float scale per block. Activations stay
float at the graph's edges, so the runtimes feed the same inputs to every variant. ONNX Runtime
runs ``MatMulNBits`` on the CPU and in onnxruntime-web (wasm and WebGPU), which is why it is the
one format we write. The quantizer knows ``MatMul`` only; ``Gemm`` by a constant weight (GPT-2's
``Conv1D`` exports as one) is first rewritten as ``MatMul`` + ``Add``, the same product.

The variants are named after their bits (``int8``, ``int4``) and registered in the export's
manifest with their method, block size and ``accuracy_level`` (MatMulNBits' attribute: unset,
activations stay float; 4, activations are quantized to int8 per block at run time).
``vlmkit export --format onnx --quantize int8`` sets 4: ONNX Runtime's CPU kernel for 8-bit weights
with float activations is slow, the int8 x int8 one is fast. The web export leaves it unset: the
browser's wasm kernels then compute what the CPU kernels compute, and its captions equal Python's.

This replaces a hand-written writer of the same int8 ``MatMulNBits`` (block 128, level 4), which kept
31 of 32 captions of the trained demo model identical to fp32; ``quantize_dynamic`` (one activation
scale per tensor), dropped with it, kept 18: SmolLM2 has activation channels 10^4 times the mean.
int4's agreement on the demo model is measured by ``benchmarks/web_quantization.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmkit.core.errors import ArtifactError, ConfigError

log = logging.getLogger(__name__)

#: variant name -> bits per weight
WEIGHT_BITS = {"int8": 8, "int4": 4}
#: ONNX Runtime's default block for int8; 32 for int4, whose coarser steps need smaller blocks
BLOCK_SIZE = {"int8": 128, "int4": 32}
#: ``accuracy_level`` for the ONNX export that the Python runtime runs on a CPU (see above)
CPU_ACCURACY_LEVEL = {"int8": 4}


@dataclass
class QuantizedGraph:
    """One quantized graph: where it went, how many MatMuls became MatMulNBits, bytes before/after."""

    path: Path
    quantized_nodes: int
    bytes_before: int
    bytes_after: int


def quantize_graph(
    source: str | Path,
    target: str | Path,
    variant: str,
    *,
    block_size: int | None = None,
    accuracy_level: int | None = None,
) -> QuantizedGraph:
    """Write ``target``: the graph ``source`` with its constant ``MatMul``/``Gemm`` weights quantized
    to ``variant`` (``int8`` or ``int4``) by ``MatMulNBitsQuantizer``."""
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
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=WEIGHT_BITS[variant],
        block_size=block_size or BLOCK_SIZE[variant],
        is_symmetric=True,
        accuracy_level=accuracy_level,
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
    return QuantizedGraph(target, quantized, source.stat().st_size, target.stat().st_size)


def quantize_graphs(
    folder: Path,
    graphs: dict[str, str],
    variant: str,
    *,
    target: Path | None = None,
    accuracy_level: int | None = None,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Quantize the graphs ``{"vision": file, "decoder": file}`` of ``folder`` to
    ``<part>.<variant>.onnx`` in ``target`` (default: ``folder``); returns the manifest's entry
    for the variant."""
    from vlmkit.export.steps import step

    target = folder if target is None else target
    block = BLOCK_SIZE[variant]
    entry: dict[str, Any] = {}
    for part in ("vision", "decoder"):
        step(on_step, f"quantizing the {part} graph to {variant} (MatMulNBits, block {block})")
        done = quantize_graph(
            folder / graphs[part], target / f"{part}.{variant}.onnx", variant, accuracy_level=accuracy_level
        )
        entry[part] = done.path.name
    entry.update(
        method="onnxruntime MatMulNBitsQuantizer",
        bits=WEIGHT_BITS[variant],
        block_size=block,
        accuracy_level=accuracy_level,
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
