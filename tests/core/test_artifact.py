"""Saved artifacts rebuild the model that was trained, batch-norm statistics included.

A model whose last encoder blocks were trained (a timm CNN with batch norm) is saved, loaded in a
fresh process, and exported (ONNX and merged HF): every copy computes the features and captions
of the in-memory model, and no load warns that the encoder differs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlmkit.core.model import PrefixConditioningVLM
from vlmkit.export import export_model
from vlmkit.runtime.onnx import OnnxCaptioner
from vlmkit.testing import sample_images, tiny_decoder_checkpoint, tiny_encoder_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

UNFROZEN = 2
CAPTION_TOKENS = 8

FRESH_PROCESS = textwrap.dedent(
    """
    import json, logging, sys
    import torch
    from safetensors.torch import load_file, save_file
    import vlmkit

    logging.basicConfig(level=logging.WARNING)  # an "encoder differs" warning goes to stderr
    folder, pixels_file, out = sys.argv[1:4]
    pixels = load_file(pixels_file)["pixels"]
    model = vlmkit.load(folder)
    with torch.no_grad():
        features = model.encode(pixels)
    save_file({"features": features.contiguous()}, out + ".safetensors")
    ids = model.generate(pixel_values=pixels, return_ids=True)
    json.dump({"ids": ids, "fingerprint": model.encoder.fingerprint()}, open(out + ".json", "w"))
    """
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny timm-CNN + Llama model whose last two encoder blocks trained a few AdamW steps."""
    root = tmp_path_factory.mktemp("unfrozen")
    config = {
        "encoder": "timm",
        "encoder_checkpoint": tiny_encoder_checkpoint("timm", root / "timm", image_size=64),
        "decoder": "smollm",
        "decoder_checkpoint": tiny_decoder_checkpoint("llama", root / "llama"),
        "projection": {"type": "linear", "reduction": "none"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "unfreeze_encoder_layers": UNFROZEN,
        "max_caption_tokens": CAPTION_TOKENS,
    }
    torch.manual_seed(0)  # LoRA's A matrices come from the global generator: one model every run
    vlm = PrefixConditioningVLM.build(config)
    images = sample_images(4)
    pixels = vlm.preprocess(images)
    buffers = {n: b.clone() for n, b in vlm.encoder.named_buffers()}
    params = {n: p.detach().clone() for n, p in vlm.encoder.named_parameters() if p.requires_grad}
    groups = vlm.trainable_parameter_groups()
    optimizer = torch.optim.AdamW([p for g in groups.values() for p in g], lr=5e-2)
    batch = vlm.tokenize(["A red circle.", "A blue square.", "A green circle.", "A red square."])
    for _ in range(3):
        vlm.train()
        loss = vlm(**batch.to_dict(), pixel_values=pixels)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # LoRA weight, so that captions depend on the decoder side of the artifact too
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in vlm.lm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5, generator=generator)
    vlm.eval()
    folder = vlm.save(root / "model")
    save_file({"pixels": pixels.contiguous()}, str(root / "pixels.safetensors"))
    return {
        "vlm": vlm,
        "root": root,
        "folder": folder,
        "pixels": pixels,
        "images": images,
        "buffers_before": buffers,
        "params_before": params,
    }


def load_in_fresh_process(folder, trained, name: str):
    root = trained["root"]
    out = root / name
    run = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(folder), str(root / "pixels.safetensors"), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "differs" not in run.stderr, run.stderr[-3000:]
    result = json.loads((out.with_suffix(".json")).read_text())
    result["features"] = load_file(str(out.with_suffix(".safetensors")))["features"]
    return result


def test_training_moves_unfrozen_weights_but_no_batchnorm_statistics(trained):
    vlm = trained["vlm"]
    layers = vlm.encoder.layers()
    changed = [
        n for n, p in vlm.encoder.named_parameters() if not torch.equal(p, trained["params_before"].get(n, p))
    ]
    assert changed, "the unfrozen blocks did not train"
    unfrozen = {id(p) for layer in layers[-UNFROZEN:] for p in layer.parameters()}
    assert all(id(dict(vlm.encoder.named_parameters())[n]) in unfrozen for n in changed)
    # batch-norm statistics are buffers: frozen blocks must not move them, unfrozen ones keep theirs
    moved = [n for n, b in vlm.encoder.named_buffers() if not torch.equal(b, trained["buffers_before"][n])]
    assert not moved, f"batch-norm statistics moved in training: {moved[:3]}"

    vlm.train()
    registered = set(vlm.encoder.modules())  # timm's layer groups are lists around real modules

    def modules(blocks):
        return [m for layer in blocks for m in layer.modules() if m in registered]

    try:
        assert not any(m.training for m in modules(layers[:-UNFROZEN]))
        unfrozen_modules = modules(layers[-UNFROZEN:])
        assert any(m.training for m in unfrozen_modules)
        assert not any(m.training for m in unfrozen_modules if isinstance(m, torch.nn.BatchNorm2d))
        assert vlm.lm.training and vlm.projection.training
    finally:
        vlm.eval()


def test_a_model_with_trained_batchnorm_blocks_loads_equal_in_a_fresh_process(trained):
    vlm, pixels = trained["vlm"], trained["pixels"]
    saved = load_file(str(trained["folder"] / "encoder.safetensors"))
    assert any(name.endswith("running_mean") for name in saved)  # buffers are saved, not only weights
    with torch.no_grad():
        want = vlm.encode(pixels)
    ids = vlm.generate(pixel_values=pixels, return_ids=True)
    assert len({t for row in ids for t in row}) > 2, "degenerate captions make a weak test"

    loaded = load_in_fresh_process(trained["folder"], trained, "artifact")
    assert torch.equal(loaded["features"], want)
    assert loaded["ids"] == ids
    assert loaded["fingerprint"] == vlm.encoder.fingerprint()


def test_onnx_and_merged_exports_of_such_a_model_caption_like_it(trained):
    vlm, pixels, images = trained["vlm"], trained["pixels"], trained["images"]
    hf = export_model(trained["folder"], trained["root"] / "hf", format="hf").path
    loaded = load_in_fresh_process(hf, trained, "hf")
    with torch.no_grad():
        assert torch.equal(loaded["features"], vlm.encode(pixels))
    assert loaded["ids"] == vlm.generate(pixel_values=pixels, return_ids=True)

    onnx = export_model(trained["folder"], trained["root"] / "onnx").path
    captioner = OnnxCaptioner(onnx, variant="fp32", threads=1)
    with torch.no_grad():
        prefix = vlm.projection(vlm.encode(pixels)).numpy()
    got = captioner.image_prefix(pixels.numpy())
    assert abs(got - prefix).max() < 1e-4 * max(1.0, abs(prefix).max())
    assert captioner.generate(images, return_ids=True) == vlm.generate(images, return_ids=True)
