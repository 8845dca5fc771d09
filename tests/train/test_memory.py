"""The memory formula behind docs/training.md's table (``vlmkit.train.memory``): its activation term, one
decoder layer's saved bytes measured and scaled by layers, rows and tokens, matches what autograd
keeps for a whole model, and the other terms count the model's own parameters."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from vlmkit.train.memory import _lora_model, activation_bytes_per_token, estimate, saved_activation_bytes

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = LlamaConfig(
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activations_scale_from_one_layer_to_the_whole_model(precision):
    """Far from the calibration's sizes (240 rows against 32 and 96), so that a per-layer constant
    counted per token (the layer's weights, once, divided by the calibration's rows) would show."""
    per_token = activation_bytes_per_token(TINY, precision)
    predicted = estimate(TINY, batch=3, tokens=80, precision=precision, per_token=per_token)
    measured = saved_activation_bytes(_lora_model(TINY, precision), 3, 80, precision)
    assert predicted.activations == pytest.approx(measured, rel=0.1)


def test_the_frozen_weights_a_layer_saves_are_not_activations():
    model = _lora_model(TINY)
    layer = sum(p.numel() * p.element_size() for p in model.get_base_model().model.layers[0].parameters())
    per_token = activation_bytes_per_token(TINY, "fp32")
    # one token's activations are a few hidden-width vectors, far less than a layer's weights
    assert 0 < per_token < layer / 10
    measured = saved_activation_bytes(model, 1, 1, "fp32")
    assert measured < TINY.num_hidden_layers * layer / 10  # one token: nearly nothing saved


def test_trained_and_frozen_terms_count_the_model_and_checkpointing_saves_memory():
    model = _lora_model(TINY)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    e = estimate(TINY, batch=8, tokens=48, precision="bf16", per_token=1e5, encoder_params=0, feature_dim=32)
    assert e.weights == 2 * frozen
    assert e.trained == 16 * (lora + 2 * 32 + 32 * 64 + 64 + 64 * 64 + 64)
    with_checkpointing = estimate(TINY, batch=8, tokens=48, gradient_checkpointing=True, per_token=1e5)
    assert with_checkpointing.activations < e.activations / 2
