"""Weight-only quantization of an ONNX export with ONNX Runtime's own quantizer.

``MatMulNBitsQuantizer`` (``onnxruntime.quantization.matmul_nbits_quantizer``) rewrites every
``MatMul`` by a constant float weight as ``com.microsoft.MatMulNBits``: the weight in blocks of
``block_size`` inputs, 4 or 8 bits each, with a float scale (and, asymmetric, a zero point) per
block. Activations stay float at the graph's edges, so the runtimes feed the same inputs to
every variant. ONNX Runtime runs ``MatMulNBits`` on the CPU and in onnxruntime-web (wasm and
WebGPU), which is why it is the one format we write.

The variants are named after their bits (``int8``, ``int4``) and live next to the float32 graphs
in the export folder (``vision.int4.onnx``, ``decoder.int4.onnx``), registered in its manifest so
that ``OnnxCaptioner(folder, variant="int4")`` runs them.

Measured on the demo model (EfficientNet-Lite0 + SmolLM2-135M trained on ``shapes``): see the
web export note in the README ("In the browser").
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vlmkit.core.errors import ArtifactError, ConfigError

log = logging.getLogger(__name__)

#: variant name -> bits per weight
WEIGHT_BITS = {"int8": 8, "int4": 4}
#: ONNX Runtime's default block; 32 halves int4's error on SmolLM2 for 6% more bytes (see README)
DEFAULT_BLOCK_SIZE = {"int8": 128, "int4": 32}


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
    symmetric: bool = True,
    accuracy_level: int | None = None,
) -> QuantizedGraph:
    """Write ``target``: the graph ``source`` with its constant ``MatMul`` weights quantized to
    ``variant`` (``int8`` or ``int4``) by ``MatMulNBitsQuantizer``.

    ``accuracy_level`` is ``MatMulNBits``' attribute (None: ONNX Runtime's default, float
    activations; 4: int8 activations per block, faster on CPUs with int8 dot products but computed
    by other kernels in the browser, so the browser's captions may then differ from Python's).
    """
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if variant not in WEIGHT_BITS:
        raise ConfigError(f"unknown quantization {variant!r}; supported: {', '.join(WEIGHT_BITS)}")
    source, target = Path(source), Path(target)
    if not source.is_file():
        raise ArtifactError(f"cannot quantize {source}: no such file")
    model = onnx.load(str(source))
    before = sum(1 for n in model.graph.node if n.op_type == "MatMul")
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=WEIGHT_BITS[variant],
        block_size=block_size or DEFAULT_BLOCK_SIZE[variant],
        is_symmetric=symmetric,
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
    if quantized == 0 and before:
        log.warning("%s: no MatMul has a constant float weight; %s is a copy", source.name, target.name)
    quantizer.model.save_model_to_file(str(target), use_external_data_format=False)
    return QuantizedGraph(target, quantized, source.stat().st_size, target.stat().st_size)


def add_quantized_variant(
    folder: str | Path,
    variant: str,
    *,
    block_size: int | None = None,
    accuracy_level: int | None = None,
    make_default: bool = False,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, QuantizedGraph]:
    """Quantize the float32 graphs of the ONNX export ``folder`` to ``variant`` and register the
    variant in its manifest (``variants[variant]``, with the method and block size).

    Returns ``{"vision": ..., "decoder": ...}``. An existing variant of that name is replaced.
    """
    from vlmkit.runtime.onnx import MANIFEST, read_onnx_manifest

    folder = Path(folder)
    manifest = read_onnx_manifest(folder)
    fp32 = manifest["variants"].get("fp32")
    if fp32 is None:
        raise ArtifactError(f"{folder} has no fp32 graphs to quantize")
    block = block_size or DEFAULT_BLOCK_SIZE.get(variant, 0)
    graphs: dict[str, QuantizedGraph] = {}
    for part in ("vision", "decoder"):
        if on_step is not None:
            on_step(f"quantizing the {part} graph to {variant} (MatMulNBits, block {block})")
        source = folder / fp32[part]
        graphs[part] = quantize_graph(
            source,
            folder / f"{part}.{variant}.onnx",
            variant,
            block_size=block,
            accuracy_level=accuracy_level,
        )
    manifest["variants"][variant] = {
        "vision": graphs["vision"].path.name,
        "decoder": graphs["decoder"].path.name,
        "method": "onnxruntime MatMulNBitsQuantizer",
        "bits": WEIGHT_BITS[variant],
        "block_size": block,
        "accuracy_level": accuracy_level,
    }
    if make_default:
        manifest["default_variant"] = variant
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return graphs
