"""``vlmkit.export.quantize``: ONNX Runtime's MatMulNBitsQuantizer, reaching Gemm too."""

from __future__ import annotations

import numpy as np
import pytest


def _gemm_graph(path, *, trans_b: int) -> np.ndarray:
    """x [B, 64] -> Gemm(x, W, bias) [B, 48], saved at ``path``; returns the float product for x = ones."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.1, (64, 48)).astype(np.float32)
    bias = rng.normal(0, 0.1, 48).astype(np.float32)
    stored = w.T.copy() if trans_b else w
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=trans_b)],
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 48])],
        [numpy_helper.from_array(stored, "w"), numpy_helper.from_array(bias, "b")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return np.ones((2, 64), dtype=np.float32) @ w + bias


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize(("variant", "tolerance"), [("int8", 0.01), ("int4", 0.1)])
def test_gemm_by_a_constant_weight_is_quantized_like_a_matmul(variant, tolerance, trans_b, tmp_path):
    import onnx
    import onnxruntime as ort

    from vlmkit.export.quantize import quantize_graph

    want = _gemm_graph(tmp_path / "fp32.onnx", trans_b=trans_b)
    done = quantize_graph(tmp_path / "fp32.onnx", tmp_path / "q.onnx", variant)
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    assert done.quantized_nodes == 1 and [n.op_type for n in graph.node] == ["MatMulNBits", "Add"]
    floats = sum(int(np.prod(t.dims)) for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    assert floats < 64 * 48 // 8, "the float weight is left (only the bias and block scales may be float)"
    (got,) = ort.InferenceSession(str(tmp_path / "q.onnx")).run(None, {"x": np.ones((2, 64), np.float32)})
    assert np.abs(got - want).max() < tolerance * np.abs(want).max()
