"""The web export's own decoder format (``vlmkit.export.web_decoder``, ``vlmkit.runtime.web_decoder``):
its quantization, its arithmetic against PyTorch on tiny random LMs of the families it computes,
and the families it refuses. The page against this arithmetic: tests/export/test_web.py."""

from __future__ import annotations

import numpy as np
import pytest

from vlmkit.runtime import web_decoder as fmt

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_int8_weights_in_blocks_of_32_keep_each_block_to_half_a_step():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    w[3, 5] = 40.0  # an outlier costs its own block only
    q, s = fmt.quantize_weight(w)
    assert q.dtype == np.int8 and s.dtype == np.float16 and s.shape == (8, 2)
    back = fmt.dequantize_weight(q, s)
    step = s.astype(np.float32).repeat(32, axis=1)
    assert np.all(np.abs(back - w) <= step * 0.5 + 1e-3 * np.abs(w))
    assert np.abs(back[3, 32:] - w[3, 32:]).max() < 0.02  # the outlier's row, the other block


def test_int16_activations_keep_outlier_channels_and_their_neighbours():
    x = np.full(64, 0.01, dtype=np.float32)
    x[7] = 80.0  # 8,000 times the rest, as SmolLM2's MLP inputs have
    back = fmt.quantize_activations(x)
    assert back[7] == pytest.approx(80.0, rel=1e-4)
    np.testing.assert_allclose(back[32:], x[32:], rtol=1e-4)  # the next block keeps its own scale
    assert np.abs(back[:32] - x[:32]).max() <= 80.0 / 32767  # half a step of the outlier's block


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_format_computes_what_pytorch_computes(arch, tmp_path):
    """A tiny random LM packed and run by ``WebDecoder``: its logits follow PyTorch's to the int8
    weights' error (the export's own check), and the greedy ids agree with PyTorch's greedy ids
    fed the same prompt embeddings where the float margins are wide."""
    import torch
    from transformers import AutoModelForCausalLM

    from vlmkit.export import web_decoder
    from vlmkit.export.onnx import embedding_table
    from vlmkit.testing.tiny_decoders import tiny_decoder_checkpoint

    lm = AutoModelForCausalLM.from_pretrained(tiny_decoder_checkpoint(arch, tmp_path / "lm")).float().eval()
    assert web_decoder.unsupported(lm) is None
    if arch == "qwen2":
        assert lm.model.layers[0].self_attn.q_proj.bias is not None  # the biases are carried
    embed = embedding_table(lm)
    spec = web_decoder.write_decoder(lm, embed, tmp_path)
    manifest = {"web": {"decoder": spec}}
    assert (tmp_path / "decoder.bin").stat().st_size == spec["bytes"]
    assert spec["architecture"]["tied"] == bool(lm.config.tie_word_embeddings)
    worst = web_decoder.check_decoder(lm, tmp_path, manifest)
    assert 0 < worst < web_decoder.TOLERANCE  # int8: not zero, and well inside the bar

    decoder = fmt.WebDecoder(tmp_path, manifest)
    prompt = decoder.embed_ids([3, 17, 29, 5])
    with torch.no_grad():
        logits = lm(inputs_embeds=torch.from_numpy(prompt.copy())[None]).logits[0, -1].numpy()
    cache = decoder.new_cache()
    got = [decoder.step(x, t, cache) for t, x in enumerate(prompt)][-1]
    assert np.abs(got - logits).max() <= web_decoder.TOLERANCE * np.abs(logits).max()


@pytest.mark.parametrize("arch", ["gpt2", "phi"])
def test_other_families_are_refused_with_the_reason(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    from vlmkit.export import web_decoder
    from vlmkit.testing.tiny_decoders import tiny_decoder_checkpoint

    lm = AutoModelForCausalLM.from_pretrained(tiny_decoder_checkpoint(arch, tmp_path / "lm"))
    assert f"model_type {arch!r}" in web_decoder.unsupported(lm)


def test_a_short_decoder_file_is_one_clear_error(tmp_path):
    from vlmkit.core.errors import ArtifactError

    (tmp_path / "decoder.bin").write_bytes(b"\0" * 16)
    spec = {
        "file": "decoder.bin",
        "tensors": {"norm": {"dtype": "float32", "shape": [8], "offset": 0, "bytes": 32}},
    }
    with pytest.raises(ArtifactError, match="shorter than its manifest"):
        fmt.read_tensors(tmp_path, spec)


def test_calibration_reads_every_layer_matrix_and_the_export_records_its_rounding(tmp_path):
    """``calibrate`` gives each layer matrix the second moments of its real inputs (padding rows
    left out), ``write_decoder`` rounds with them and says so, and ``caption_agreement`` is the
    manifest's entry (what ``--format web`` records and the CLI prints)."""
    import torch

    from vlmkit.core.model import PrefixConditioningVLM
    from vlmkit.export import web_decoder
    from vlmkit.export.onnx import agreement_images, embedding_table, merged_decoder
    from vlmkit.testing.tiny_decoders import tiny_decoder_checkpoint
    from vlmkit.testing.tiny_encoders import tiny_encoder_checkpoint

    torch.manual_seed(0)
    vlm = PrefixConditioningVLM.build({
        "encoder": "timm",
        "encoder_checkpoint": tiny_encoder_checkpoint("timm", tmp_path / "encoder", image_size=64),
        "decoder": "smollm",
        "decoder_checkpoint": tiny_decoder_checkpoint("llama", tmp_path / "decoder"),
        "projection": {"reduction": "none"},
        "max_caption_tokens": 6,
    }).eval()  # fmt: skip
    lm = merged_decoder(vlm)
    images = agreement_images(5)
    hessians = web_decoder.calibrate(vlm, lm, images, batch=2)  # rows of unequal length: padding
    layers, hidden = len(lm.model.layers), lm.config.hidden_size
    assert len(hessians) == 7 * layers
    h = hessians["layers.0.q"]
    assert h.shape == (hidden, hidden) and h.dtype == torch.float64
    torch.testing.assert_close(h, h.T)
    assert torch.linalg.eigvalsh(h).min() > -1e-6 * h.diagonal().max()
    assert hessians["layers.0.down"].shape[0] == lm.config.intermediate_size

    spec = web_decoder.write_decoder(lm, embedding_table(lm), tmp_path, hessians=hessians)
    assert spec["rounding"] == "error-compensated"
    manifest = {"web": {"decoder": spec}}
    assert web_decoder.check_decoder(lm, tmp_path, manifest) < web_decoder.TOLERANCE
    entry = web_decoder.caption_agreement(vlm, tmp_path, manifest, images[:3], threshold=0.9)
    assert entry["images"] == 3 and 0 <= entry["identical"] <= 3
    assert entry["variant"] == "int8 web decoder" and entry["vs"] == "fp32 PyTorch"


def test_calibration_reads_a_local_training_split_and_never_a_dataset_that_may_download(tmp_path):
    """``calibration_images``: the training split where it is on this machine (``scenes`` is drawn);
    drawn shapes, with the reason, for a hub dataset (loading it could download a split) or no model."""
    import json

    from vlmkit.export.web import calibration_images

    def model(datasets):
        folder = tmp_path / datasets[0]["name"]
        folder.mkdir()
        config = {"datasets": datasets, "seed": 0}
        manifest = {
            "format": "vlmkit-model",
            "format_version": 1,
            "config": {},
            "training": {"config": config},
        }
        (folder / "vlmkit.json").write_text(json.dumps(manifest))
        return {"model": str(folder)}

    scenes = [{"name": "scenes", "options": {"size": 40, "heldout_size": 4, "kinds": ["single"]}}]
    images, where = calibration_images(model(scenes), n=5)
    assert len(images) == 5 and where == "images of the training split (scenes)"
    images, where = calibration_images(model([{"name": "coco"}]), n=3)
    assert len(images) == 3 and where.startswith("drawn shapes") and "coco may need a download" in where
    assert calibration_images(None, n=2)[1].startswith("drawn shapes")
