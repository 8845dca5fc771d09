"""The trainable bridge from encoder features [B, N, Dv] to LM prefix embeddings [B, K, Dlm].

Token reduction runs first, so the prefix has K tokens instead of N. Fewer prefix tokens make
every training step and every generated token cheaper, and a 7x7 or 14x14 grid carries far more
spatial detail than a caption needs.

- ``avgpool``: adaptive average pooling of the patch grid to ``tokens`` (a square number) cells.
- ``pixel_shuffle``: folds each ``factor x factor`` block of neighbouring patches into one token
  with ``factor**2`` times the width (nothing is averaged away; the projection learns the mix).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vlmkit.core.errors import ConfigError


class ProjectionConfig(BaseModel):
    """How encoder features become the LM prefix."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["linear", "mlp"] = Field("mlp", description="linear, or mlp (Linear-GELU-Linear).")
    reduction: Literal["none", "avgpool", "pixel_shuffle"] = Field(
        "none",
        description="Token reduction of the encoder's patch grid before projecting: none (every token), "
        "avgpool (to projection.tokens) or pixel_shuffle (fold projection.factor squared patches into one).",
    )
    tokens: int | None = Field(
        None,
        gt=0,
        description="Prefix tokens after average pooling (a square number: 9, 16, 64). Given without a "
        "reduction it selects avgpool; with reduction none or pixel_shuffle it is refused.",
    )
    factor: int = Field(2, ge=1, description="pixel_shuffle: fold factor x factor patches into one token.")
    layernorm: bool = Field(True, description="LayerNorm on the features before projecting.")
    hidden_dim: int | None = Field(None, gt=0, description="mlp hidden width (default: the LM's width).")

    @model_validator(mode="before")
    @classmethod
    def _tokens_select_avgpool(cls, data: Any) -> Any:
        # a prefix-token count alone means average pooling: the only reduction that uses it
        if isinstance(data, dict) and data.get("tokens") is not None and data.get("reduction") is None:
            data = {**data, "reduction": "avgpool"}
        return data

    @model_validator(mode="after")
    def _check(self) -> ProjectionConfig:
        if self.reduction == "avgpool":
            if self.tokens is None:
                raise ValueError("projection.reduction 'avgpool' needs projection.tokens (e.g. 16)")
            if math.isqrt(self.tokens) ** 2 != self.tokens:
                raise ValueError(f"projection.tokens must be a square number for avgpool, got {self.tokens}")
        elif self.tokens is not None:  # it would be ignored: every encoder token, or the factor's fold
            raise ValueError(
                f"projection.tokens {self.tokens} applies to reduction avgpool only, not {self.reduction!r}; "
                "drop the token count or use reduction avgpool"
            )
        return self

    def output_tokens(self, num_tokens: int, grid: tuple[int, int] | None) -> int:
        """K, the number of prefix tokens this projection produces from N encoder tokens."""
        if self.reduction == "none":
            return num_tokens
        rows, cols = _require_grid(self, grid)
        if self.reduction == "avgpool":
            side = math.isqrt(self.tokens)  # type: ignore[arg-type]
            if side > rows or side > cols:
                raise ConfigError(
                    f"projection.tokens {self.tokens} ({side}x{side}) is more than the encoder's {rows}x{cols} "
                    f"grid gives; avgpool only reduces: use at most {min(rows, cols) ** 2} or reduction 'none'"
                )
            return self.tokens  # type: ignore[return-value]
        return math.ceil(rows / self.factor) * math.ceil(cols / self.factor)


def _require_grid(config: ProjectionConfig, grid: tuple[int, int] | None) -> tuple[int, int]:
    if grid is None:
        raise ConfigError(
            f"projection.reduction {config.reduction!r} needs an encoder whose tokens form a grid; "
            "this encoder has none: use reduction 'none'"
        )
    return grid


def reduce_tokens(features, config: ProjectionConfig, grid: tuple[int, int] | None):
    """[B, N, Dv] -> [B, K, Dv] (avgpool), [B, K, f*f*Dv] (pixel_shuffle); no parameters: cacheable."""
    from torch import nn

    (b, n, d), (rows, cols) = features.shape, _require_grid(config, grid)
    if n != rows * cols:
        raise ValueError(f"features have {n} tokens but the encoder grid is {rows}x{cols}")
    x = features.reshape(b, rows, cols, d)
    if config.reduction == "avgpool":
        side = math.isqrt(config.tokens)  # type: ignore[arg-type]
        return adaptive_avg_pool(x.permute(0, 3, 1, 2), (side, side)).flatten(2).transpose(1, 2)
    f = config.factor
    pad_r, pad_c = (-rows) % f, (-cols) % f
    if pad_r or pad_c:  # replicate edges so every fold is full
        x = nn.functional.pad(x.permute(0, 3, 1, 2), (0, pad_c, 0, pad_r), mode="replicate")
        x = x.permute(0, 2, 3, 1)
        rows, cols = rows + pad_r, cols + pad_c
    x = x.reshape(b, rows // f, f, cols // f, f, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (rows // f) * (cols // f), f * f * d)


def adaptive_avg_pool(x, size: tuple[int, int]):
    """``adaptive_avg_pool2d(x, size)`` of ``[..., H, W]`` in ops every backend has: Apple MPS (and
    ONNX) cannot pool adaptively to a size that does not divide the map (7x7 -> 3x3); there it is
    two products with fixed averaging matrices (pooling is separable), else a plain average pool."""
    import torch

    rows, cols = (int(n) for n in x.shape[-2:])
    if rows % size[0] == 0 and cols % size[1] == 0:
        return torch.nn.functional.avg_pool2d(x, (rows // size[0], cols // size[1]))
    return torch.einsum(
        "...rc,ir,jc->...ij", x, pooling_matrix(rows, size[0]).to(x), pooling_matrix(cols, size[1]).to(x)
    )


def pooling_matrix(size: int, out: int):
    """[out, size]: row i averages the cells adaptive pooling gives output i."""
    import torch

    m = torch.zeros(out, size)
    for i in range(out):
        lo, hi = (i * size) // out, math.ceil((i + 1) * size / out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def build_projection(config: ProjectionConfig, feature_dim: int, lm_dim: int, grid: tuple[int, int] | None):
    """A ``torch.nn.Module`` mapping features [B, N, Dv] to prefix embeddings [B, K, Dlm]."""
    import torch
    from torch import nn

    class Projection(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config, self.grid = config, grid
            in_dim = feature_dim * (config.factor**2 if config.reduction == "pixel_shuffle" else 1)
            reduces = config.reduction != "none"  # (K, width) once reduced; refuses a grid too small
            self.reduced_shape = reduces and (config.output_tokens(0, grid), in_dim)
            self.norm = nn.LayerNorm(in_dim) if config.layernorm else nn.Identity()
            if config.type == "linear":
                self.proj = nn.Linear(in_dim, lm_dim)
            else:
                hidden = config.hidden_dim or lm_dim
                self.proj = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, lm_dim))

        def reduce(self, features: torch.Tensor) -> torch.Tensor:
            if not self.reduced_shape or tuple(features.shape[1:]) == self.reduced_shape:  # cached: reduced
                return features
            return reduce_tokens(features, config, self.grid)

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            weight = next(self.proj.parameters())  # features follow the projection's device and dtype
            x = self.reduce(features.to(device=weight.device, dtype=weight.dtype))
            return self.proj(self.norm(x))

    return Projection()
