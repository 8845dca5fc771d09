"""``shapes``: a synthetic captioning dataset that needs no download.

Each image is one coloured shape on a plain, slightly varying background; its caption follows from
the image alone ("A red circle on the left."), so a model that learns shows it by getting held-out
captions exactly right. It is the embedded default dataset and the quickest proof that training
works. Images are drawn on demand (PIL) from a per-example seed: nothing is stored.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

import vlmkit
from vlmkit import CaptionExample, ConfigError, DataError, DatasetSpec
from vlmkit.sdk.datasets import (
    DEFAULT_FRACTIONS,
    ListDataset,
    SplitFractions,
    check_split,
    fingerprint,
    parse_options,
    stratified_splits,
)

#: bump when the drawing changes, so cached features of old images are never reused
GENERATOR_VERSION = 1

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (30, 160, 60),
    "blue": (35, 75, 220),
    "yellow": (235, 205, 30),
    "orange": (245, 130, 20),
    "purple": (135, 50, 175),
    "pink": (240, 110, 180),
    "brown": (120, 75, 35),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
#: position -> (phrase, centre x range, centre y range), as fractions of the image size
POSITIONS: dict[str, tuple[str, tuple[float, float], tuple[float, float]]] = {
    "left": ("on the left", (0.22, 0.28), (0.35, 0.65)),
    "right": ("on the right", (0.72, 0.78), (0.35, 0.65)),
    "top": ("at the top", (0.35, 0.65), (0.22, 0.28)),
    "bottom": ("at the bottom", (0.35, 0.65), (0.72, 0.78)),
    "middle": ("in the middle", (0.45, 0.55), (0.45, 0.55)),
}


class ShapesOptions(BaseModel):
    """Options of the ``shapes`` dataset."""

    model_config = ConfigDict(extra="forbid")

    size: int = Field(
        3000, ge=1, description="images across all splits (each caption class gets an equal share)"
    )
    image_size: int = Field(64, ge=16, le=1024, description="side of the square images, in pixels")
    colors: list[str] = Field(
        default=["red", "green", "blue", "yellow"], description=f"any of {', '.join(COLORS)}"
    )
    shapes: list[str] = Field(
        default=["circle", "square", "triangle"], description=f"any of {', '.join(SHAPES)}"
    )
    positions: list[str] = Field(default=["left", "right"], description=f"any of {', '.join(POSITIONS)}")
    split_fractions: SplitFractions = Field(
        DEFAULT_FRACTIONS,
        description="train / validation / test fractions, applied within each caption class",
    )

    @field_validator("colors", "shapes", "positions")
    @classmethod
    def _known(cls, value: list[str], info) -> list[str]:
        allowed = {"colors": COLORS, "shapes": SHAPES, "positions": POSITIONS}[info.field_name]
        unknown = [v for v in value if v not in allowed]
        if unknown:
            raise ValueError(f"unknown {info.field_name} {unknown}; choose from {', '.join(allowed)}")
        if not value or len(set(value)) != len(value):
            raise ValueError(f"{info.field_name} must be a non-empty list without repeats")
        return value


def caption_for(color: str, shape: str, position: str) -> str:
    article = "An" if color[0] in "aeiou" else "A"
    return f"{article} {color} {shape} {POSITIONS[position][0]}."


@dataclass(frozen=True)
class ShapeImage:
    """Draws one example on demand; a picklable zero-argument callable (DataLoader workers)."""

    index: int
    color: str
    shape: str
    position: str
    image_size: int

    def __call__(self):
        from PIL import ImageDraw

        # a string seed is hashed with sha512 by ``random``: the same image on every machine
        rng = random.Random(f"vlmkit-shapes:{GENERATOR_VERSION}:{self.index}")
        s = self.image_size
        img = canvas(rng, s)
        _, xs, ys = POSITIONS[self.position]
        cx, cy = rng.uniform(*xs) * s, rng.uniform(*ys) * s
        r = rng.uniform(0.13, 0.19) * s
        draw_shape(ImageDraw.Draw(img), self.shape, cx, cy, r, jittered(rng, self.color))
        return img


def canvas(rng: random.Random, size: int):
    """A square image of a light grey, slightly tinted background (one draw from ``rng`` for the
    shade, then one per channel: the order the drawings' seeds were made with)."""
    from PIL import Image

    shade = rng.randint(200, 235)
    background = tuple(min(255, max(0, shade + rng.randint(-6, 6))) for _ in range(3))
    return Image.new("RGB", (size, size), background)


def jittered(rng: random.Random, color: str) -> tuple[int, ...]:
    """``COLORS[color]`` with each channel moved by up to 12."""
    return tuple(min(255, max(0, c + rng.randint(-12, 12))) for c in COLORS[color])


def draw_shape(draw, shape: str, cx: float, cy: float, r: float, fill, *, square=0.9, triangle=0.85) -> None:
    """``shape`` of radius ``r`` centred at ``(cx, cy)``; ``square`` and ``triangle`` are the half
    side and the base's offset below the centre, as fractions of ``r``."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = r * square
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * triangle), (cx + r, cy + r * triangle)], fill=fill)
    else:  # diamond
        draw.polygon([(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)], fill=fill)


class ShapesDataset(DatasetSpec):
    local = True  # never downloads
    name: ClassVar[str] = "shapes"
    description: ClassVar[str] = (
        "Synthetic coloured shapes with exact captions ('A red circle on the left.'); no download"
    )
    options: ClassVar[type[BaseModel]] = ShapesOptions

    def load(self, split: str, options: Mapping[str, Any] | None = None, *, seed: int = 0) -> ListDataset:
        check_split(split, "shapes")
        opts: ShapesOptions = parse_options(self, options)
        classes = list(itertools.product(opts.colors, opts.shapes, opts.positions))
        if opts.size < len(classes):
            raise ConfigError(
                f"dataset 'shapes': size={opts.size} is smaller than the {len(classes)} caption classes "
                f"({len(opts.colors)} colours x {len(opts.shapes)} shapes x {len(opts.positions)} positions)"
            )
        # example i has class i % len(classes): every class gets an equal share
        ids_by_class: dict[int, list[str]] = {c: [] for c in range(len(classes))}
        for i in range(opts.size):
            ids_by_class[i % len(classes)].append(_example_id(i))
        assignment = stratified_splits(ids_by_class, seed, opts.split_fractions)
        examples = []
        for i in range(opts.size):
            if assignment[_example_id(i)] != split:
                continue
            color, shape, position = classes[i % len(classes)]
            examples.append(
                CaptionExample(
                    id=_example_id(i),
                    captions=[caption_for(color, shape, position)],
                    image=ShapeImage(i, color, shape, position, opts.image_size),
                )
            )
        if not examples:
            raise DataError(
                f"dataset 'shapes': split {split!r} is empty (size={opts.size}, "
                f"split_fractions={list(opts.split_fractions)}); raise size or that split's fraction"
            )
        fp = fingerprint("shapes", GENERATOR_VERSION, opts.model_dump(), split, seed)
        return ListDataset(examples, fp, name="shapes", info={"split": split, "classes": len(classes)})


def _example_id(index: int) -> str:
    return f"shapes-{index:06d}"


@vlmkit.hookimpl
def register_datasets(register):
    register(ShapesDataset())
