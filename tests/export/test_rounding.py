"""Error-compensating rounding (``vlmkit.export.rounding``): the web decoder's int8 format, chosen
to lower the error of the product over the inputs a matrix sees rather than of each weight."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmkit.export.rounding import error_compensated
from vlmkit.runtime import web_decoder as fmt

pytestmark = pytest.mark.usefixtures("one_torch_thread")


#: correlates the inputs' channels
MIXING = np.random.default_rng(9).standard_normal((128, 128)) * 0.3 + np.eye(128)


def _inputs(rng, rows=512):
    """Correlated inputs with a few outlier channels, as an LM's hidden states have."""
    x = rng.standard_normal((rows, 128)) @ MIXING
    x[:, [5, 70]] *= 20.0
    return x.astype(np.float32)


def test_the_product_error_is_lower_than_nearest_rounding_in_the_same_format():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 128)) * 0.05).astype(np.float32)
    x = _inputs(rng)
    q, s = error_compensated(w, torch.from_numpy(x.T @ x).double())
    assert q.dtype == np.int8 and s.dtype == np.float16 and s.shape == (64, 4)
    assert np.abs(q).max() <= 127
    nearest = fmt.dequantize_weight(*fmt.quantize_weight(w))
    compensated = fmt.dequantize_weight(q, s)
    held_out = _inputs(np.random.default_rng(1))  # other draws of the same statistics
    error = lambda v: float(np.linalg.norm(held_out @ (v - w).T))  # noqa: E731
    assert error(compensated) < 0.8 * error(nearest)  # 0.73 here


def test_inputs_that_never_fire_leave_nearest_rounding_where_nothing_is_learnt():
    """A channel that is always zero gets weight 0 (it cannot matter), and with ``H`` a multiple of
    the identity (inputs without correlation) the rounding is the nearest one."""
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((8, 64)) * 0.05).astype(np.float32)
    q, s = error_compensated(w, torch.eye(64, dtype=torch.float64))
    nq, ns = fmt.quantize_weight(w)
    np.testing.assert_array_equal(q, nq)
    np.testing.assert_array_equal(s, ns)
    h = torch.eye(64, dtype=torch.float64)
    h[3, 3] = 0
    q, _ = error_compensated(w, h)
    assert np.all(q[:, 3] == 0)
