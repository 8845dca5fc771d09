"""The timm encoder's ``features`` option: chosen stages, pooled to one grid, concatenated, and a
part of the fingerprint (the feature cache keys on it); encoder options reach plugins validated."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from vlmkit.core.config import ModelConfig, encoder_options
from vlmkit.core.errors import ConfigError, PluginError
from vlmkit.core.registry import Registry
from vlmkit.plugins.encoders.timm import TimmOptions
from vlmkit.testing.tiny_encoders import tiny_encoder_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def registry() -> Registry:
    reg = Registry()
    reg.load_entry_points(environ={"VLMKIT_PLUGINS": "timm,siglip"})
    return reg


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return tiny_encoder_checkpoint("timm", tmp_path_factory.mktemp("timm"), image_size=96)


def test_feature_stages_are_pooled_to_the_coarsest_grid_and_concatenated(registry, checkpoint):
    spec = registry.encoder("timm")
    default = spec.load(checkpoint)
    staged = spec.load(checkpoint, options=TimmOptions(features=[1, -1]))
    info = staged.backbone.feature_info
    assert staged.grid == default.grid  # the last map is the coarsest
    assert staged.feature_dim == info[1]["num_chs"] + default.feature_dim

    pixels = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        tokens = staged(pixels)
        final, (stage1,) = staged.backbone.forward_intermediates(
            pixels, indices=[1], intermediates_only=False
        )
    expected = (
        torch.cat([F.adaptive_avg_pool2d(stage1, default.grid), final], dim=1).flatten(2).transpose(1, 2)
    )
    assert tokens.shape == (2, default.num_tokens, staged.feature_dim)
    torch.testing.assert_close(tokens, expected)
    torch.testing.assert_close(tokens[..., info[1]["num_chs"] :], default(pixels))


def test_feature_stages_change_the_fingerprint_and_only_they_do(registry, checkpoint):
    spec = registry.encoder("timm")
    default = spec.load(checkpoint).fingerprint()
    assert spec.load(checkpoint, options=TimmOptions(features=[-1])).fingerprint() == default
    two = spec.load(checkpoint, options=TimmOptions(features=[1, -1])).fingerprint()
    assert two not in {default, spec.load(checkpoint, options=TimmOptions(features=[2, -1])).fingerprint()}
    assert spec.load(checkpoint, options=TimmOptions(features=[1, -1])).fingerprint() == two


def test_a_stage_the_backbone_lacks_is_refused(registry, checkpoint):
    with pytest.raises(PluginError, match=r"has feature stages 0\.\.\d"):
        registry.encoder("timm").load(checkpoint, options=TimmOptions(features=[99]))
    with pytest.raises(ValueError, match="distinct stage indices"):
        TimmOptions(features=[2, 2])


def test_encoder_options_from_the_model_config_are_validated(registry, checkpoint):
    timm_spec = registry.encoder("timm")
    config = ModelConfig(encoder="timm", encoder_checkpoint=checkpoint, encoder_options={"features": [1, -1]})
    assert encoder_options(timm_spec, config.model_copy(update={"encoder_options": {}})) == {}
    options = encoder_options(timm_spec, config)["options"]
    assert isinstance(options, TimmOptions) and options.features == [1, -1]
    with pytest.raises(ConfigError, match=r"model.encoder_options \(timm\): layers: unknown setting"):
        encoder_options(timm_spec, config.model_copy(update={"encoder_options": {"layers": [1]}}))
    siglip = ModelConfig(encoder="siglip", encoder_options={"features": [1]})
    with pytest.raises(ConfigError, match=r"model.encoder_options \(siglip\): features: unknown setting"):
        encoder_options(registry.encoder("siglip"), siglip)


@pytest.fixture(scope="module")
def tf_lite0(tmp_path_factory) -> str:
    """The embedded default's architecture (TF "same" padding: sizes computed in the graph), random."""
    folder = tmp_path_factory.mktemp("lite0")
    return tiny_encoder_checkpoint("timm", folder, image_size=96, timm_model="tf_efficientnet_lite0")


@pytest.mark.parametrize("stages", [[4], [2, 4], [1, -1]], ids=["stage4", "stages2+4", "stage1+last"])
def test_feature_stages_export_to_onnx_equal_to_pytorch(registry, tf_lite0, stages, tmp_path):
    """The embedded default feeds the prefix from one stage (``[4]``): its vision graph must export
    (ONNX has no adaptive pooling over sizes it cannot see) and match PyTorch at another batch size."""
    pytest.importorskip("onnxruntime")
    from vlmkit.core.projection import ProjectionConfig, build_projection
    from vlmkit.export.onnx import VisionGraph, check_vision_graph, export_vision_graph

    encoder = registry.encoder("timm").load(tf_lite0, options=TimmOptions(features=stages))
    projection = build_projection(
        ProjectionConfig(type="mlp", reduction="avgpool", tokens=4), encoder.feature_dim, 32, encoder.grid
    )
    vision = VisionGraph(encoder, projection).eval()
    pixels = torch.randn(2, 3, 96, 96)
    export_vision_graph(vision, pixels, tmp_path / "vision.onnx", opset=17)
    assert check_vision_graph(tmp_path / "vision.onnx", vision, pixels) < 1e-4


@pytest.mark.parametrize("features", [None, [2], [1, 2]])
def test_every_parameter_of_the_last_layer_gets_a_gradient(registry, checkpoint, features):
    """Unfreezing the last layer must train only what computes the features: with stages before the
    last map (the embedded default's ``features: [4]``), EfficientNet's head convolution never runs,
    and a trainable parameter without a gradient stops DDP at its second step."""
    from vlmkit.plugins.encoders.timm import TimmOptions

    options = TimmOptions(features=features) if features else None
    encoder = registry.encoder("timm").load(checkpoint, **({"options": options} if options else {}))
    last = encoder.layers()[-1].requires_grad_(True)
    encoder(torch.randn(2, 3, 96, 96)).float().pow(2).mean().backward()
    unused = [n for n, p in last.named_parameters() if p.grad is None]
    assert not unused, unused


def _flat(colour, size: int = 96):
    """An image of one colour."""
    from PIL import Image

    return Image.new("RGB", (size, size), colour)


def test_colour_bins_add_a_histogram_of_each_tokens_pixels(registry, checkpoint):
    spec = registry.encoder("timm")
    default = spec.load(checkpoint)
    coloured = spec.load(checkpoint, options=TimmOptions(colour_bins=3))
    assert coloured.grid == default.grid and coloured.feature_dim == default.feature_dim + 27
    assert coloured.fingerprint() != default.fingerprint()

    from PIL import ImageDraw

    image = _flat((128, 128, 128))
    ImageDraw.Draw(image).rectangle([0, 0, 47, 95], fill=(255, 0, 0))  # left half red, right half grey
    pixels = coloured.preprocess([image])
    with torch.no_grad():
        tokens = coloured(pixels)
    torch.testing.assert_close(tokens[..., : default.feature_dim], default(pixels))
    histogram = tokens[0, :, default.feature_dim :].reshape(-1, 3, 3, 3) ** 2  # back from sqrt: fractions
    torch.testing.assert_close(
        histogram.sum(dim=(1, 2, 3)), torch.ones(coloured.num_tokens), atol=1e-4, rtol=0
    )
    left, right = histogram[0], histogram[coloured.grid[1] - 1]  # the first row's first and last cells
    assert left[2, 0, 0] > 0.9  # (r, g, b) bin of red
    assert right[1, 1, 1] > 0.9  # mid grey
    assert 1.0 / 3 < histogram[..., 2, 0, 0].mean() < 2.0 / 3  # about half the image is red


def test_colour_is_told_apart_by_shape_blind_bins(registry, checkpoint):
    """Yellow and orange (the scenes' near colours) land in different bins, whatever the shape."""
    from vlmkit.plugins.datasets.shapes import COLORS
    from vlmkit.sdk.encoders import colour_histogram

    images = [_flat(COLORS["yellow"]), _flat(COLORS["orange"])]
    pixels = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 for im in images])
    hist = colour_histogram(pixels, grid=(2, 2), bins=5, mean=(0, 0, 0), std=(1, 1, 1))
    assert hist.shape == (2, 4, 125)
    yellow, orange = hist[0, 0].argmax().item(), hist[1, 0].argmax().item()
    assert yellow != orange and (yellow // 5) % 5 > (orange // 5) % 5  # more green in yellow


def test_in_grey_the_backbone_sees_luminance_only_and_the_histogram_sees_hue(registry, checkpoint):
    """``greyscale``: two colours of one luminance give the backbone the same image; only the
    colour histogram tells them apart."""
    spec = registry.encoder("timm")
    grey = spec.load(checkpoint, options=TimmOptions(greyscale=True, colour_bins=3))
    assert grey.fingerprint() != spec.load(checkpoint, options=TimmOptions(colour_bins=3)).fingerprint()
    # BT.601 luminance 0.299 r + 0.587 g + 0.114 b: 129.9 and 129.8
    pixels = grey.preprocess([_flat((200, 100, 100)), _flat((82, 160, 100))])
    with torch.no_grad():
        tokens = grey(pixels)
        colour = spec.load(checkpoint, options=TimmOptions(colour_bins=3))(pixels)
    width = grey.feature_dim - 27
    in_grey = (tokens[0, :, :width] - tokens[1, :, :width]).abs().max()
    in_colour = (colour[0, :, :width] - colour[1, :, :width]).abs().max()
    assert in_grey * 10 < in_colour
    assert (tokens[0, :, width:] - tokens[1, :, width:]).abs().max() > 0.5  # the histogram tells them apart


def test_colour_weight_scales_the_histogram_only(registry, checkpoint):
    spec = registry.encoder("timm")
    plain = spec.load(checkpoint, options=TimmOptions(colour_bins=3))
    heavy = spec.load(checkpoint, options=TimmOptions(colour_bins=3, colour_weight=16.0))
    assert heavy.fingerprint() != plain.fingerprint(), "cached features of another weight would be reused"
    pixels = plain.preprocess([_flat((200, 40, 40)), _flat((40, 40, 200))])
    with torch.no_grad():
        a, b = plain(pixels), heavy(pixels)
    width = plain.feature_dim - 27
    torch.testing.assert_close(b[..., :width], a[..., :width])
    torch.testing.assert_close(b[..., width:], 16.0 * a[..., width:])


def test_colour_bins_are_validated():
    with pytest.raises(ValueError, match="at least 2"):
        TimmOptions(colour_bins=1)
    with pytest.raises(ValueError):
        TimmOptions(colour_bins=9)
    with pytest.raises(ValueError):
        TimmOptions(colour_bins=5, colour_weight=0)


def test_colour_bins_export_to_onnx_equal_to_pytorch(registry, tf_lite0, tmp_path):
    pytest.importorskip("onnxruntime")
    from vlmkit.core.projection import ProjectionConfig, build_projection
    from vlmkit.export.onnx import VisionGraph, check_vision_graph, export_vision_graph

    encoder = registry.encoder("timm").load(tf_lite0, options=TimmOptions(features=[4], colour_bins=5))
    projection = build_projection(
        ProjectionConfig(type="mlp", reduction="avgpool", tokens=4), encoder.feature_dim, 32, encoder.grid
    )
    vision = VisionGraph(encoder, projection).eval()
    pixels = torch.rand(2, 3, 96, 96) * 2 - 1
    export_vision_graph(vision, pixels, tmp_path / "vision.onnx", opset=17)
    assert check_vision_graph(tmp_path / "vision.onnx", vision, pixels) < 1e-4
