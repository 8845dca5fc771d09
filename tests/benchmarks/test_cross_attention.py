"""``benchmarks/cross_attention.py``: the cross-attention row of the quality benchmark conditions
a vlmkit model on the image through gated cross-attention instead of a prefix. Its comparison is
only fair if, at step 0, the model is exactly the pretrained LM on prompt + caption (no prefix, no
perturbation), and if training reaches the new layers and generation reads the image."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from vlmkit.core.model import PrefixConditioningVLM
from vlmkit.testing import tiny_decoder_checkpoint, tiny_encoder_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.cross_attention import attach  # noqa: E402

CAPTIONS = ["A small red circle at the top left.", "A large blue square in the middle."]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    config = {
        "encoder": "siglip",
        "encoder_checkpoint": tiny_encoder_checkpoint("siglip", root / "siglip", image_size=32),
        "decoder": "smollm",
        "decoder_checkpoint": tiny_decoder_checkpoint("llama", root / "llama"),
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "projection": {"type": "mlp", "reduction": "avgpool", "tokens": 4},
        "max_caption_tokens": 12,
    }
    return lambda: PrefixConditioningVLM.build(config, seed=0)


def test_at_step_zero_the_model_is_the_lm_on_prompt_and_caption(build):
    model = build()
    params = attach(model)
    assert params and model.num_prefix_tokens == 0
    features = torch.randn(2, model.encoder.num_tokens, model.encoder.feature_dim)
    batch = model.tokenize(CAPTIONS).to_dict()
    assert not batch["image_mask"].any()  # no image slots in the sequence
    logits = model(**batch, features=features, return_logits=True)["logits"]
    with torch.no_grad():
        alone = model.language_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    torch.testing.assert_close(logits, alone)


def test_training_opens_the_gates_and_generation_then_depends_on_the_image(build):
    model = build()
    params = attach(model)
    optimizer = torch.optim.AdamW(params + model.trainable_parameter_groups()["projection"], lr=1e-2)
    features = torch.randn(2, model.encoder.num_tokens, model.encoder.feature_dim)
    batch = model.tokenize(CAPTIONS).to_dict()
    for _ in range(3):
        model(**batch, features=features)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(block.gate.item() != 0 for block in model.cross_attention)
    with torch.no_grad():
        a = model(**batch, features=features, return_logits=True)["logits"]
        b = model(**batch, features=torch.randn_like(features), return_logits=True)["logits"]
    assert not torch.allclose(a, b)  # the image reaches the LM only through cross-attention
    ids = model.generate(features=features, max_new_tokens=5, return_ids=True)
    assert len(ids) == 2 and all(len(row) <= 5 for row in ids)
