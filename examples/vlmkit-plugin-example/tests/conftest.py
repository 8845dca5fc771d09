"""Fixtures: a tiny random Mistral checkpoint and a folder of images listed in a CSV file."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from vlmkit_plugin_example.testing import tiny_mistral_checkpoint

#: 40 images are few: 60/20/20 splits keep a handful in validation and test whatever the seed
FRACTIONS = [0.6, 0.2, 0.2]

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
SHAPES = ["circle", "square"]


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory) -> str:
    """A tiny Mistral-Instruct checkpoint folder (``[INST]`` template), built once per session."""
    return tiny_mistral_checkpoint(tmp_path_factory.mktemp("mistral"))


def write_images(folder: Path, n: int) -> list[tuple[str, str]]:
    """``n`` small PNGs of coloured shapes in ``folder/images``; ``(relative path, caption)`` each."""
    from PIL import Image, ImageDraw

    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        colour, shape = COLOURS[i % len(COLOURS)], SHAPES[(i // len(COLOURS)) % len(SHAPES)]
        image = Image.new("RGB", (32, 32), "grey")
        draw = ImageDraw.Draw(image)
        box = (4 + i % 8, 6, 24 + i % 8, 26)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour)
        relative = f"images/{i:03d}-{colour}-{shape}.png"
        image.save(folder / relative)
        rows.append((relative, f"A {colour} {shape}."))
    return rows


def write_csv(file: Path, rows: list[dict[str, str]], columns=("path", "url", "caption")) -> Path:
    file.parent.mkdir(parents=True, exist_ok=True)
    with file.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})
    return file


@pytest.fixture
def csv_file(tmp_path) -> Path:
    """``tmp_path/data/captions.csv`` listing 40 images in ``tmp_path/data/images``, one caption each."""
    folder = tmp_path / "data"
    rows = write_images(folder, 40)
    return write_csv(folder / "captions.csv", [{"path": p, "caption": c} for p, c in rows])


@pytest.fixture
def csv_options(csv_file) -> dict:
    """Options of ``captions-csv`` for ``csv_file``."""
    return {"path": str(csv_file), "split_fractions": FRACTIONS}
