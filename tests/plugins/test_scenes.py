"""The ``scenes`` dataset: deterministic, held-out compositions kept out of training, and captions
that say what the image shows (checked by reading the objects back from the pixels)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from scipy import ndimage

from vlmkit.core.errors import ConfigError
from vlmkit.plugins.datasets.scenes import (
    COLORS,
    SIZES,
    ScenesDataset,
    parse_caption,
    position_phrase,
)
from vlmkit.testing import check_dataset

SMALL = {"size": 400, "heldout_size": 60}


def _pairs_of(example) -> set[tuple[str, str]]:
    return {(o.color, o.shape) for o in example.image.scene.objects}


def test_scenes_keeps_the_dataset_contract():
    sizes = check_dataset(ScenesDataset(), SMALL)
    assert sizes["test"] == 60  # the default test split is the held-out stream


def test_scenes_is_deterministic_per_seed_and_the_seed_moves_splits_not_images():
    first = ScenesDataset().load("train", SMALL, seed=3)
    again = ScenesDataset().load("train", SMALL, seed=3)
    assert [ex.id for ex in first] == [ex.id for ex in again]
    assert [ex.captions for ex in first] == [ex.captions for ex in again]
    assert first.fingerprint == again.fingerprint
    for i in (0, 7):
        assert np.array_equal(np.asarray(first[i].load_image()), np.asarray(again[i].load_image()))

    other = ScenesDataset().load("train", SMALL, seed=4)
    assert {ex.id for ex in other} != {ex.id for ex in first}
    assert other.fingerprint != first.fingerprint
    by_id = {ex.id: ex for ex in other}
    shared = [ex for ex in first if ex.id in by_id][:5]
    assert shared
    for ex in shared:  # the same id is the same image and captions under any split seed
        assert ex.captions == by_id[ex.id].captions
        assert np.array_equal(np.asarray(ex.load_image()), np.asarray(by_id[ex.id].load_image()))


def test_heldout_pairs_never_occur_in_train_validation_or_the_seen_test():
    options = {"size": 3000, "heldout_size": 200}
    heldout = {("red", "triangle"), ("green", "diamond"), ("blue", "circle"), ("yellow", "square")}
    seen_sets = [ScenesDataset().load(s, options) for s in ("train", "validation")]
    seen_sets.append(ScenesDataset().load("test", {**options, "test": "seen"}))
    train_pairs = set()
    for data in seen_sets:
        for ex in data:
            pairs = _pairs_of(ex)
            assert not pairs & heldout, f"{ex.id} shows held-out {pairs & heldout}"
            for caption in ex.captions:  # and no caption names one, e.g. "a small red triangle"
                assert not any(f"{c} {s}" in caption for c, s in heldout), caption
            if data is seen_sets[0]:
                train_pairs |= pairs
    # every colour and shape of a held-out pair is trained on, just never together
    assert (
        train_pairs
        == {(c, s) for c in list(COLORS)[:6] for s in ("circle", "square", "triangle", "diamond")} - heldout
    )

    test = ScenesDataset().load("test", options)
    assert len(test) == 200
    assert all(_pairs_of(ex) & heldout for ex in test)
    assert {p for ex in test for p in _pairs_of(ex) & heldout} == heldout
    assert not {ex.id for ex in test} & {ex.id for data in seen_sets for ex in data}


def test_captions_are_many_and_every_phrasing_parses():
    train = ScenesDataset().load("train", {"size": 3000})
    canonical = {ex.captions[0] for ex in train}
    assert len(canonical) > 1000  # not a handful of classes to memorise
    kinds = Counter(parse_caption(ex.captions[0])["kind"] for ex in train)
    assert set(kinds) == {"single", "pair", "count", "row"}
    for ex in list(train)[:300]:
        parsed = [parse_caption(c) for c in ex.captions]
        assert len(ex.captions) == 2
        assert Counter(parsed[0]["objects"]) == Counter(parsed[1]["objects"])


def test_parse_caption_refuses_text_outside_the_grammar():
    for text in ("A red circle.", "Two small red circle.", "A small red circle near a large blue square."):
        with pytest.raises(ValueError, match="not a scenes caption"):
            parse_caption(text)


# ------------------------------------------------------------------ render -> parse -> compare


def _detect(image) -> list[tuple[tuple[str, str, str], int, int]]:
    """The objects an image shows, read from its pixels: ((size, colour, shape), row, col)."""
    pixels = np.asarray(image).astype(int)
    s = pixels.shape[0]
    foreground = pixels.max(axis=2) - pixels.min(axis=2) > 60  # the background is grey
    labels, n = ndimage.label(foreground)
    palette = {name: np.array(rgb) for name, rgb in COLORS.items()}
    found = []
    for i in range(1, n + 1):
        ys, xs = np.nonzero(labels == i)
        mean = pixels[ys, xs].mean(axis=0)
        color = min(palette, key=lambda c: np.abs(palette[c] - mean).sum())
        height, width = np.ptp(ys) + 1, np.ptp(xs) + 1
        fill = len(ys) / (height * width)
        rows = np.bincount(ys - ys.min())
        if fill > 0.9:
            shape, k = "square", 1.7**2
        elif fill > 0.7:
            shape, k = "circle", math.pi
        elif rows.argmax() / height > 0.75:  # widest at the bottom
            shape, k = "triangle", 1.8
        else:
            shape, k = "diamond", 1.6
        radius = math.sqrt(len(ys) / k) / s
        size = "small" if radius < (SIZES["small"] + SIZES["large"]) / 2 else "large"
        found.append(((size, color, shape), int(ys.mean() * 3 // s), int(xs.mean() * 3 // s)))
    return found


def _check_caption_against_image(caption: str, objects) -> None:
    parsed = parse_caption(caption)
    assert Counter(parsed["objects"]) == Counter(look for look, _, _ in objects), caption
    where = {look: (row, col) for look, row, col in objects}
    if parsed["kind"] == "single":
        assert parsed["position"] == position_phrase(*where[parsed["objects"][0]]), caption
    elif parsed["kind"] == "pair":
        (r1, c1), (r2, c2) = (where[o] for o in parsed["objects"])
        expected = {
            "to the left of": r1 == r2 and c1 < c2,
            "to the right of": r1 == r2 and c1 > c2,
            "above": c1 == c2 and r1 < r2,
            "below": c1 == c2 and r1 > r2,
        }
        assert expected[parsed["relation"]], caption
    elif parsed["kind"] == "row":
        cells = [where[o] for o in parsed["objects"]]
        axis = 1 if parsed["relation"] == "from left to right" else 0
        assert len({c[1 - axis] for c in cells}) == 1, caption  # one row (or column)
        assert [c[axis] for c in cells] == sorted(c[axis] for c in cells), caption


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_caption_matches_the_objects_drawn(split):
    data = ScenesDataset().load(split, SMALL)
    for ex in list(data)[:60]:
        objects = _detect(ex.load_image())
        for caption in ex.captions:
            _check_caption_against_image(caption, objects)


def test_a_wrong_caption_fails_the_image_check():
    """The render->parse check can fail: a caption of another scene does not match this image."""
    data = ScenesDataset().load("train", SMALL)
    ex, other = data[0], next(e for e in data if e.captions[0] != data[0].captions[0])
    with pytest.raises(AssertionError):
        _check_caption_against_image(other.captions[0], _detect(ex.load_image()))


def test_options_are_validated_naming_the_key():
    with pytest.raises(ConfigError, match="heldout"):
        ScenesDataset().load("train", {"heldout": ["red hexagon"]})
    with pytest.raises(ConfigError, match="held out with every shape"):
        ScenesDataset().load(
            "train", {"colors": ["red", "blue"], "shapes": ["circle"], "heldout": ["red circle"]}
        )
    with pytest.raises(ConfigError, match="did you mean 'heldout'"):
        ScenesDataset().load("train", {"held_out": []})


def test_colour_swap_is_the_right_objects_with_a_wrong_colour():
    from vlmkit.plugins.datasets.scenes import colour_swap

    ref = "A large yellow square at the bottom left."
    assert colour_swap("A large orange square at the bottom left.", ref)
    assert colour_swap("There is a large orange square at the top.", ref)  # position is not colour
    assert not colour_swap(ref, ref)
    assert not colour_swap("A small orange square at the bottom left.", ref)  # the size is wrong too
    assert not colour_swap("A large yellow circle at the bottom left.", ref)
    assert not colour_swap("A yellow blob.", ref)  # outside the grammar
    pair = "A small red circle to the left of a large blue square."
    assert colour_swap("A small red circle to the left of a large green square.", pair)
    assert not colour_swap("A large blue square to the right of a small red circle.", pair)
