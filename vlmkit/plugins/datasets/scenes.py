"""``scenes``: synthetic multi-object scenes whose test split holds compositions never trained on.

``shapes`` proves that training learns, but every test caption of it was also a training caption,
so any recipe that learns at all reaches its ceiling. ``scenes`` asks for more: 1-3 objects with
a size, a colour and a shape on a 3x3 grid, captioned with their relations, counts and positions
in several phrasings (thousands of distinct captions), and a test split of scenes holding
colour-shape pairs that never occur in training. A model that captions those exactly has learnt
to read colour and shape separately, not to recognise memorised objects.

Grammar (every caption of an image is a valid reference; ``captions_for`` lists them all)::

    object   := article size colour shape            "a small red circle", "an ..." never occurs
    single   := Object position "."                  "A small red circle at the top left."
              | "There is" object position "."
    pair     := Object "to the left of" object "."   (same row; the first is the left one)
              | Object "to the right of" object "."  (the same two objects, the other way round)
              | Object "above" object "."            (same column; the first is the upper one)
              | Object "below" object "."
    count    := Number size colour shape-s "."       "Two small red circles."   (identical objects)
              | "There are" number size colour shape-s "."
    row      := Object "," object "and" object "from left to right."     (three objects in a row)
              | "From left to right:" object "," object "and" object "."
                (and "from top to bottom" for three objects in a column)
    position := "at the top left" | "at the top" | "at the top right" | "on the left" |
                "in the middle" | "on the right" | "at the bottom left" | "at the bottom" |
                "at the bottom right"

Objects of a pair or a row are distinct (they differ in size, colour or shape); identical
objects are always counted. ``parse_caption`` reads any caption of this grammar back.

Splits and held-out rules:

- ``heldout`` (option) names colour-shape pairs, by default one per shape ("red triangle",
  "green diamond", "blue circle", "yellow square"): each of their colours and shapes is common in
  training, the pair itself never is.
- The *seen* stream (``size`` scenes, ids ``scenes-NNNNNN``) uses no held-out pair anywhere. Its
  images are split by id into train / validation / test (``split_fractions``, seeded).
- The *held-out* stream (``heldout_size`` scenes, ids ``scenes-heldout-NNNNNN``) puts at least one
  held-out pair in every scene; it is only ever returned as the test split.
- ``test`` chooses what the ``test`` split is: ``heldout`` (the compositional test, default) or
  ``seen`` (the in-distribution test: the seen stream's test share). Train and validation are
  the same for both, so one trained model is scored on both test sets.

Images are drawn on demand (PIL) from the example's index: the same image on every machine; the
split seed moves images between splits, never changes them.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

import vlmkit
from vlmkit import CaptionExample, DataError, DatasetSpec
from vlmkit.plugins.datasets.shapes import COLORS, SHAPES, canvas, draw_shape, jittered
from vlmkit.sdk.datasets import (
    DEFAULT_FRACTIONS,
    ListDataset,
    SplitFractions,
    assign_split,
    check_split,
    fingerprint,
    parse_options,
)

#: bump when the drawing or the captions change, so cached features of old images are never reused
GENERATOR_VERSION = 1

# the same palette and shapes as the shapes dataset: one table of what "red" looks like
#: size -> radius as a fraction of the image side (a grid cell is a third of it)
SIZES: dict[str, float] = {"small": 0.08, "large": 0.13}
#: the most a centre moves off its cell's centre, as a fraction of the image side: with the largest
#: radius (x1.05) objects in neighbouring cells stay apart (0.13 * 1.05 + 0.012 < 1/6)
JITTER = 0.012
ROWS = ("top", "middle", "bottom")
COLS = ("left", "middle", "right")
KINDS = ("single", "pair", "count", "row")
NUMBERS = {2: "two", 3: "three"}
DEFAULT_HELDOUT = ["red triangle", "green diamond", "blue circle", "yellow square"]


def position_phrase(row: int, col: int) -> str:
    if (row, col) == (1, 1):
        return "in the middle"
    if row == 1:
        return f"on the {COLS[col]}"
    return f"at the {ROWS[row]}" + ("" if col == 1 else f" {COLS[col]}")


class ScenesOptions(BaseModel):
    """Options of the ``scenes`` dataset."""

    model_config = ConfigDict(extra="forbid")

    size: int = Field(
        4000, ge=10, description="scenes without held-out pairs (train + validation + seen test)"
    )
    heldout_size: int = Field(
        200, ge=1, description="scenes with a held-out colour-shape pair (the heldout test)"
    )
    test: Literal["heldout", "seen"] = Field(
        "heldout", description="the test split: held-out compositions, or in-distribution scenes"
    )
    image_size: int = Field(96, ge=48, le=1024, description="side of the square images, in pixels")
    colors: list[str] = Field(
        default=["red", "green", "blue", "yellow", "purple", "orange"],
        description=f"any of {', '.join(COLORS)}",
    )
    shapes: list[str] = Field(default=list(SHAPES), description=f"any of {', '.join(SHAPES)}")
    sizes: list[str] = Field(default=list(SIZES), description=f"any of {', '.join(SIZES)}")
    kinds: list[str] = Field(default=list(KINDS), description=f"scene kinds drawn, any of {', '.join(KINDS)}")
    heldout: list[str] = Field(
        default=DEFAULT_HELDOUT, description="'colour shape' pairs that never occur in train or validation"
    )
    phrasings: Literal["all", "first"] = Field(
        "all", description="references per image: every phrasing of the grammar, or only the first"
    )
    split_fractions: SplitFractions = Field(
        DEFAULT_FRACTIONS, description="train / validation / test fractions of the seen scenes"
    )

    @field_validator("colors", "shapes", "sizes", "kinds")
    @classmethod
    def _known(cls, value: list[str], info) -> list[str]:
        allowed = {"colors": COLORS, "shapes": SHAPES, "sizes": SIZES, "kinds": KINDS}[info.field_name]
        unknown = [v for v in value if v not in allowed]
        if unknown:
            raise ValueError(f"unknown {info.field_name} {unknown}; choose from {', '.join(allowed)}")
        if not value or len(set(value)) != len(value):
            raise ValueError(f"{info.field_name} must be a non-empty list without repeats")
        return value

    @model_validator(mode="after")
    def _check_heldout(self) -> ScenesOptions:
        for pair in self.heldout:
            parts = pair.split()
            if len(parts) != 2 or parts[0] not in self.colors or parts[1] not in self.shapes:
                raise ValueError(
                    f"heldout pair {pair!r} must be 'colour shape' from the chosen colors and shapes"
                )
        if len(set(self.heldout)) != len(self.heldout):
            raise ValueError("heldout pairs repeat")
        seen = set(self.pairs()) - set(self.heldout_pairs())
        for color in self.colors:
            if not any(c == color for c, _ in seen):
                raise ValueError(f"colour {color!r} is held out with every shape: training never shows it")
        for shape in self.shapes:
            if not any(s == shape for _, s in seen):
                raise ValueError(f"shape {shape!r} is held out with every colour: training never shows it")
        return self

    def pairs(self) -> list[tuple[str, str]]:
        return [(c, s) for c in self.colors for s in self.shapes]

    def heldout_pairs(self) -> list[tuple[str, str]]:
        return [tuple(p.split()) for p in self.heldout]  # type: ignore[misc]


@dataclass(frozen=True)
class SceneObject:
    size: str
    color: str
    shape: str
    row: int
    col: int

    @property
    def look(self) -> tuple[str, str, str]:
        return (self.size, self.color, self.shape)

    def phrase(self, plural: bool = False) -> str:
        return f"{self.size} {self.color} {self.shape}{'s' if plural else ''}"


@dataclass(frozen=True)
class Scene:
    """What one image shows; ``objects`` of a pair or row are in reading order (left/top first)."""

    kind: str
    objects: tuple[SceneObject, ...]
    axis: str = ""  # pair/row: "row" (side by side) or "col" (stacked)


def captions_for(scene: Scene) -> list[str]:
    """Every caption of the grammar that describes ``scene`` (the first is the canonical one)."""
    objs = scene.objects
    a = [f"a {o.phrase()}" for o in objs]
    if scene.kind == "single":
        where = position_phrase(objs[0].row, objs[0].col)
        out = [f"{a[0]} {where}.", f"there is {a[0]} {where}."]
    elif scene.kind == "count":
        many = f"{NUMBERS[len(objs)]} {objs[0].phrase(plural=True)}"
        out = [f"{many}.", f"there are {many}."]
    elif scene.kind == "pair":
        first, then = ("to the left of", "to the right of") if scene.axis == "row" else ("above", "below")
        out = [f"{a[0]} {first} {a[1]}.", f"{a[1]} {then} {a[0]}."]
    else:
        order = "from left to right" if scene.axis == "row" else "from top to bottom"
        listed = f"{a[0]}, {a[1]} and {a[2]}"
        out = [f"{listed} {order}.", f"{order}: {listed}."]
    return [c[0].upper() + c[1:] for c in out]


_OBJECT = r"a (small|large) (\w+) (circle|square|triangle|diamond)"


def parse_caption(caption: str) -> dict[str, Any]:
    """Read a caption of the grammar back: ``{"kind", "objects": [(size, colour, shape), ...],
    "count", "relation", "position"}``, objects in the order the caption names them, relation as
    the caption states it ("above", "to the right of", "from top to bottom", ...).
    Raises ``ValueError`` for text outside the grammar (used to score attributes of predictions)."""
    text = caption.strip().lower().rstrip(".")
    text = re.sub(r"^there (?:is|are) ", "", text)
    obj = re.compile(_OBJECT)
    positions = "|".join(re.escape(position_phrase(r, c)) for r in range(3) for c in range(3))
    if m := re.fullmatch(rf"({_OBJECT}) ({positions})", text):
        return {"kind": "single", "objects": [m.groups()[1:4]], "position": m.group(5)}
    if m := re.fullmatch(r"(two|three) (small|large) (\w+) (circle|square|triangle|diamond)s", text):
        n = 2 if m.group(1) == "two" else 3
        return {"kind": "count", "objects": [m.groups()[1:4]] * n, "count": n}
    relations = "to the left of|to the right of|above|below"
    if m := re.fullmatch(rf"({_OBJECT}) ({relations}) ({_OBJECT})", text):
        g = m.groups()
        return {"kind": "pair", "objects": [g[1:4], g[6:9]], "relation": g[4]}
    orders = "from left to right|from top to bottom"
    listed = rf"({_OBJECT}), ({_OBJECT}) and ({_OBJECT})"
    m = re.fullmatch(rf"{listed} ({orders})", text) or re.fullmatch(rf"({orders}): {listed}", text)
    if m:
        found = [tuple(x.groups()) for x in obj.finditer(text)]
        order = next(g for g in m.groups() if g in orders.split("|"))
        return {"kind": "row", "objects": found, "relation": order}
    raise ValueError(f"not a scenes caption: {caption!r}")


def colour_swap(prediction: str, reference: str) -> bool:
    """Whether ``prediction`` names the same objects as ``reference`` (sizes and shapes, in any
    order) except for a colour: the typical error on held-out colour-shape pairs, where a model
    names the colour it saw with that shape in training. Text outside the grammar is no swap."""
    try:
        pred, ref = parse_caption(prediction)["objects"], parse_caption(reference)["objects"]
    except ValueError:
        return False
    without_colour = sorted((size, shape) for size, _, shape in pred)
    return sorted(map(tuple, pred)) != sorted(map(tuple, ref)) and without_colour == sorted(
        (size, shape) for size, _, shape in ref
    )


@dataclass(frozen=True)
class SceneImage:
    """Draws one scene on demand; a picklable zero-argument callable (DataLoader workers)."""

    key: str
    scene: Scene
    image_size: int

    def __call__(self):
        from PIL import ImageDraw

        # a string seed is hashed with sha512 by ``random``: the same image on every machine
        rng = random.Random(f"vlmkit-scenes-draw:{GENERATOR_VERSION}:{self.key}")
        s = self.image_size
        img = canvas(rng, s)
        draw = ImageDraw.Draw(img)
        cell = s / 3
        for o in self.scene.objects:
            cx = (o.col + 0.5) * cell + rng.uniform(-JITTER, JITTER) * s
            cy = (o.row + 0.5) * cell + rng.uniform(-JITTER, JITTER) * s
            r = SIZES[o.size] * s * rng.uniform(0.95, 1.05)
            # scenes draw squares and triangles slimmer than shapes does
            draw_shape(draw, o.shape, cx, cy, r, jittered(rng, o.color), square=0.85, triangle=0.8)
        return img


# ------------------------------------------------------------------------------ scene sampling


def sample_scene(rng: random.Random, opts: ScenesOptions, pairs: list, must: list | None = None) -> Scene:
    """One scene whose objects use ``pairs``; with ``must``, at least one object uses one of those."""
    kind = rng.choice(opts.kinds)

    def look(forced: bool) -> tuple[str, str, str]:
        color, shape = rng.choice(must if forced else pairs)
        return (rng.choice(opts.sizes), color, shape)

    if kind == "count":
        n = rng.choice((2, 3))
        cells = rng.sample(range(9), n)
        size, color, shape = look(must is not None)
        objs = [SceneObject(size, color, shape, c // 3, c % 3) for c in sorted(cells)]
        return Scene("count", tuple(objs))
    if kind == "single":
        cell = rng.randrange(9)
        size, color, shape = look(must is not None)
        return Scene("single", (SceneObject(size, color, shape, cell // 3, cell % 3),))
    n = 2 if kind == "pair" else 3
    axis = rng.choice(("row", "col"))
    line = rng.randrange(3)
    slots = sorted(rng.sample(range(3), n))
    forced = rng.randrange(n) if must is not None else -1
    looks: list[tuple[str, str, str]] = []
    while len(looks) < n:  # objects of a pair or row are distinct, else they would be counted
        candidate = look(len(looks) == forced)
        if candidate not in looks:
            looks.append(candidate)
    objs = [
        SceneObject(*lk, *((line, slot) if axis == "row" else (slot, line)))
        for lk, slot in zip(looks, slots, strict=True)
    ]
    return Scene(kind, tuple(objs), axis)


class ScenesDataset(DatasetSpec):
    local = True  # never downloads
    name: ClassVar[str] = "scenes"
    description: ClassVar[str] = (
        "Synthetic 1-3 object scenes with relations and counts; the test split holds held-out "
        "colour-shape pairs (compositional generalisation); no download"
    )
    options: ClassVar[type[BaseModel]] = ScenesOptions

    def load(self, split: str, options: Mapping[str, Any] | None = None, *, seed: int = 0) -> ListDataset:
        check_split(split, "scenes")
        opts: ScenesOptions = parse_options(self, options)
        heldout = opts.heldout_pairs()
        seen_pairs = [p for p in opts.pairs() if p not in heldout]
        examples = []
        if split == "test" and opts.test == "heldout":
            if not heldout:
                raise DataError(
                    "dataset 'scenes': test 'heldout' needs heldout pairs; set heldout or test: seen"
                )
            for i in range(opts.heldout_size):
                key = f"scenes-heldout-{i:06d}"
                scene = sample_scene(_scene_rng(key, opts), opts, opts.pairs(), must=heldout)
                examples.append(_example(key, scene, opts))
        else:
            for i in range(opts.size):
                key = f"scenes-{i:06d}"
                if assign_split(key, seed, opts.split_fractions) != split:
                    continue
                examples.append(_example(key, sample_scene(_scene_rng(key, opts), opts, seen_pairs), opts))
        if not examples:
            raise DataError(
                f"dataset 'scenes': split {split!r} is empty (size={opts.size}, "
                f"split_fractions={list(opts.split_fractions)}); raise size or that split's fraction"
            )
        fp = fingerprint("scenes", GENERATOR_VERSION, opts.model_dump(), split, seed)
        info = {"split": split, "test": opts.test, "heldout": opts.heldout}
        return ListDataset(examples, fp, name="scenes", info=info)


def _scene_rng(key: str, opts: ScenesOptions) -> random.Random:
    # The scene depends on the options that shape it, not on the split seed or sizes: growing
    # ``size`` adds scenes without changing the existing ones.
    shape_opts = (opts.colors, opts.shapes, opts.sizes, opts.kinds, opts.heldout)
    return random.Random(f"vlmkit-scenes:{GENERATOR_VERSION}:{shape_opts}:{key}")


def _example(key: str, scene: Scene, opts: ScenesOptions) -> CaptionExample:
    captions = captions_for(scene)
    if opts.phrasings == "first":
        captions = captions[:1]
    return CaptionExample(id=key, captions=captions, image=SceneImage(key, scene, opts.image_size))


@vlmkit.hookimpl
def register_datasets(register):
    register(ScenesDataset())
