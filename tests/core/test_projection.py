"""The projection (``vlmkit.core.projection``): encoder features [B, N, Dv] become the LM prefix
[B, K, Dlm], with optional token reduction (average pooling or pixel-shuffle) of the patch grid."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from vlmkit.core.config import ModelConfig, validate_model_config
from vlmkit.core.errors import ConfigError
from vlmkit.core.projection import ProjectionConfig, build_projection

DV, DLM = 8, 12


def features(rows: int, cols: int, batch: int = 2, dim: int = DV) -> torch.Tensor:
    """Distinct values everywhere, so any dropped or duplicated cell shows."""
    return torch.arange(batch * rows * cols * dim, dtype=torch.float32).reshape(batch, rows * cols, dim)


def project(grid, **config):
    cfg = ProjectionConfig(**config)
    module = build_projection(cfg, DV, DLM, grid)
    return cfg, module


# ------------------------------------------------------------------------------ projection types


def test_linear_maps_every_token_to_the_lm_width():
    _, module = project((4, 4), type="linear")
    assert isinstance(module.proj, torch.nn.Linear)
    assert module(features(4, 4)).shape == (2, 16, DLM)


def test_mlp_is_linear_gelu_linear_with_the_lm_width_as_default_hidden_size():
    _, module = project((4, 4), type="mlp")
    first, act, last = module.proj
    assert isinstance(act, torch.nn.GELU)
    assert (first.in_features, first.out_features, last.out_features) == (DV, DLM, DLM)
    assert module(features(4, 4)).shape == (2, 16, DLM)
    _, wide = project((4, 4), type="mlp", hidden_dim=40)
    assert wide.proj[0].out_features == 40
    assert wide(features(4, 4)).shape == (2, 16, DLM)


def test_layernorm_is_optional():
    _, with_norm = project(None, type="linear")
    _, without = project(None, type="linear", layernorm=False)
    assert isinstance(with_norm.norm, torch.nn.LayerNorm)
    assert isinstance(without.norm, torch.nn.Identity)


def test_no_reduction_keeps_every_token_and_needs_no_grid():
    cfg, module = project(None)
    assert cfg.output_tokens(7, None) == 7
    assert module(torch.randn(3, 7, DV)).shape == (3, 7, DLM)


# ------------------------------------------------------------------------------ avgpool


@pytest.mark.parametrize(("grid", "tokens"), [((4, 4), 4), ((7, 7), 16), ((6, 4), 4), ((7, 7), 1)])
def test_avgpool_gives_exactly_the_requested_number_of_tokens(grid, tokens):
    cfg, module = project(grid, reduction="avgpool", tokens=tokens)
    assert cfg.output_tokens(grid[0] * grid[1], grid) == tokens
    assert module(features(*grid)).shape == (2, tokens, DLM)


def test_avgpool_averages_each_region_of_the_grid():
    _, module = project((4, 4), reduction="avgpool", tokens=4)
    x = features(4, 4)
    pooled = module.reduce(x)
    grid = x.reshape(2, 4, 4, DV)
    top_left = grid[:, :2, :2].mean(dim=(1, 2))
    bottom_right = grid[:, 2:, 2:].mean(dim=(1, 2))
    assert torch.allclose(pooled[:, 0], top_left)
    assert torch.allclose(pooled[:, 3], bottom_right)


@pytest.mark.parametrize(("grid", "tokens"), [((4, 4), 25), ((6, 4), 25), ((7, 7), 64)])
def test_avgpool_to_more_tokens_than_the_grid_is_refused_not_upsampled(grid, tokens):
    cfg = ProjectionConfig(reduction="avgpool", tokens=tokens)
    side = math.isqrt(tokens)
    match = (
        rf"projection\.tokens {tokens} \({side}x{side}\) is more than the encoder's {grid[0]}x{grid[1]} grid"
    )
    with pytest.raises(ConfigError, match=match):
        cfg.output_tokens(grid[0] * grid[1], grid)
    with pytest.raises(ConfigError, match=match):
        build_projection(cfg, DV, DLM, grid)


@pytest.mark.parametrize("tokens", [2, 5, 12])
def test_avgpool_to_a_non_square_count_is_refused_naming_the_setting(tokens):
    with pytest.raises(ValidationError, match=r"projection\.tokens must be a square number"):
        ProjectionConfig(reduction="avgpool", tokens=tokens)
    # as users meet it: a one-line ConfigError from the model config
    with pytest.raises(
        ConfigError, match=r"projection\.tokens must be a square number.*got " + str(tokens)
    ) as exc:
        validate_model_config({"projection": {"reduction": "avgpool", "tokens": tokens}})
    assert "\n" not in str(exc.value)


def test_avgpool_without_a_token_count_is_refused_naming_the_setting():
    with pytest.raises(ConfigError, match=r"needs projection\.tokens"):
        validate_model_config(ModelConfig().model_dump() | {"projection": {"reduction": "avgpool"}})


# ------------------------------------------------------------------------------ pixel shuffle


@pytest.mark.parametrize(
    ("grid", "factor", "want"),
    [
        ((4, 4), 2, 4),  # even: every fold is full
        ((8, 6), 2, 12),
        ((6, 6), 3, 4),
        ((5, 5), 2, 9),  # odd: replicate-padded to 6x6
        ((7, 7), 2, 16),  # EfficientNet/Lite0 at 224 px
        ((5, 3), 2, 6),  # odd both ways, not square
        ((4, 4), 3, 4),  # padded to 6x6
    ],
)
def test_pixel_shuffle_token_count_matches_the_module_output(grid, factor, want):
    cfg, module = project(grid, reduction="pixel_shuffle", factor=factor)
    k = cfg.output_tokens(grid[0] * grid[1], grid)
    assert k == want
    assert module.reduce(features(*grid)).shape == (2, k, DV * factor**2)
    assert module(features(*grid)).shape == (2, k, DLM)


def test_pixel_shuffle_is_a_permutation_of_the_features_on_an_even_grid():
    """Nothing is averaged away: the folded tokens hold exactly the input values, rearranged."""
    _, module = project((4, 6), reduction="pixel_shuffle", factor=2)
    x = features(4, 6)
    folded = module.reduce(x)
    for b in range(2):
        assert torch.equal(folded[b].flatten().sort().values, x[b].flatten().sort().values)
    assert torch.equal(folded.sum(), x.sum())


def test_pixel_shuffle_folds_each_block_of_neighbours_into_one_token():
    _, module = project((4, 4), reduction="pixel_shuffle", factor=2)
    x = features(4, 4)
    grid = x.reshape(2, 4, 4, DV)
    folded = module.reduce(x)
    # token 1 is the block of rows 0-1, cols 2-3, in row-major order
    block = grid[:, 0:2, 2:4].reshape(2, 4 * DV)
    assert torch.equal(folded[:, 1], block)


def test_pixel_shuffle_replicates_the_edge_of_an_odd_grid():
    _, module = project((5, 5), reduction="pixel_shuffle", factor=2)
    x = features(5, 5)
    grid = x.reshape(2, 5, 5, DV)
    folded = module.reduce(x).reshape(2, 3, 3, 2, 2, DV)  # [B, 3, 3 blocks, 2 x 2 cells, D]
    # the last block of the first row covers cols 4 and (padding) 5: both are col 4
    assert torch.equal(folded[:, 0, 2, :, 0], grid[:, 0:2, 4])
    assert torch.equal(folded[:, 0, 2, :, 1], grid[:, 0:2, 4])
    # every input value is still there; the extra ones are copies of the last row/column
    assert set(x.flatten().tolist()) == set(folded.flatten().tolist())
    assert folded.numel() == 2 * 6 * 6 * DV


def test_pixel_shuffle_widens_the_input_of_the_projection():
    _, module = project((4, 4), reduction="pixel_shuffle", factor=2, type="linear")
    assert module.proj.in_features == DV * 4
    assert module.norm.normalized_shape == (DV * 4,)


# ------------------------------------------------------------------------------ grids


@pytest.mark.parametrize(
    "config", [{"reduction": "avgpool", "tokens": 4}, {"reduction": "pixel_shuffle", "factor": 2}]
)
def test_reduction_needs_an_encoder_with_a_grid(config):
    cfg = ProjectionConfig(**config)
    with pytest.raises(ConfigError, match="needs an encoder whose tokens form a grid") as exc:
        cfg.output_tokens(16, None)
    assert "reduction 'none'" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="needs an encoder whose tokens form a grid"):
        build_projection(cfg, DV, DLM, None)


def test_features_that_do_not_fill_the_grid_are_refused():
    _, module = project((4, 4), reduction="avgpool", tokens=4)
    with pytest.raises(ValueError, match="15 tokens but the encoder grid is 4x4"):
        module(torch.randn(1, 15, DV))


def test_projection_output_follows_its_own_dtype():
    _, module = project((4, 4), reduction="pixel_shuffle")
    module.to(torch.float64)
    with torch.no_grad():
        out = module(features(4, 4))  # float32 features in, float64 prefix out
    assert out.dtype == torch.float64
    assert math.isfinite(float(out.sum()))


# ------------------------------------------------------------------------------ pooling on every backend


@pytest.mark.parametrize("size", [(7, 7), (14, 14), (7, 5), (9, 4), (16, 16)])
@pytest.mark.parametrize("out", [(1, 1), (2, 2), (3, 3), (4, 4)])
def test_adaptive_avg_pool_equals_torchs_adaptive_pooling(size, out):
    from vlmkit.core.projection import adaptive_avg_pool

    x = torch.randn(2, 5, *size, dtype=torch.float64)
    torch.testing.assert_close(adaptive_avg_pool(x, out), torch.nn.functional.adaptive_avg_pool2d(x, out))


def test_avgpool_to_a_grid_that_does_not_divide_the_map_uses_only_ops_mps_has(monkeypatch):
    """Apple MPS refuses adaptive average pooling to a size that does not divide the input (the
    demo pools 7x7 to 3x3): ``vlmkit demo`` crashed at its first caption. Here adaptive pooling is
    refused as MPS refuses it, and the reduction still gives what it gives elsewhere."""
    cfg, module = project((7, 7), reduction="avgpool", tokens=9)
    x = features(7, 7)
    expected = module(x)
    grid = x.reshape(2, 7, 7, DV).permute(0, 3, 1, 2)
    pooled = torch.nn.functional.adaptive_avg_pool2d(grid, (3, 3)).flatten(2).transpose(1, 2)

    def mps_adaptive_pool(inp, output_size):
        raise RuntimeError("Adaptive pool MPS: input sizes must be divisible by output sizes")

    monkeypatch.setattr(torch.nn.functional, "adaptive_avg_pool2d", mps_adaptive_pool)
    monkeypatch.setattr(torch._C._nn, "adaptive_avg_pool2d", mps_adaptive_pool)
    torch.testing.assert_close(module(x), expected)
    torch.testing.assert_close(module.reduce(x), pooled)
