"""Hostile files through ``vlmkit caption``, ``eval`` and ``export``, third pass: memory that stays
flat however many images a call names, images whose shape would blow up when resized, captions
files built to crash a parser, and output paths that cannot be written.

The models are tiny and untrained (their captions do not matter here): SigLIP (a fixed 32x32
resize) or CLIP (the shortest edge to 32, the aspect ratio kept) with GPT-2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from PIL import Image

from vlmkit.core.model import PrefixConditioningVLM
from vlmkit.testing import sample_images, tiny_decoder_checkpoint, tiny_encoder_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build_model(root: Path, encoder: str) -> Path:
    config = {
        "encoder": encoder,
        "encoder_checkpoint": tiny_encoder_checkpoint(encoder, root / encoder, image_size=32),
        "decoder": "gpt2",
        "decoder_checkpoint": tiny_decoder_checkpoint("gpt2", root / "gpt2"),
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "max_caption_tokens": 4,
    }
    return PrefixConditioningVLM.build(config).save(root / "model")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("siglip-model"), "siglip")


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("clip-model"), "clip")


@pytest.fixture
def good(tmp_path) -> list[str]:
    paths = []
    for i, image in enumerate(sample_images(2)):
        image.save(tmp_path / f"good{i}.png")
        paths.append(str(tmp_path / f"good{i}.png"))
    return paths


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


# ------------------------------------------------------------------------------ memory and size


def test_a_thin_strip_is_refused_before_resizing_and_the_others_are_captioned(
    clip_model, good, tmp_path, run_main, capsys
):
    strip = tmp_path / "strip.png"  # 640,000 pixels at a shortest edge of 32
    Image.new("RGB", (1, 20000), "white").save(strip)
    code, err = run_main("caption", good[0], str(strip), good[1], "--model", str(clip_model))
    assert code == 1
    assert [line.split(": ", 1)[1] for line in error_lines(err)] == [
        f"image '{strip}' is 1x20000 pixels, more than 50 times longer than wide: resizing it would "
        "multiply its pixels; crop it",
        "1 of 3 images could not be read",
    ]


def test_the_onnx_runtime_refuses_a_strip_before_resizing_it():
    from vlmkit.core.errors import DataError
    from vlmkit.runtime.onnx import preprocess_images

    spec = {
        "resize": {"size": {"shortest_edge": 8}, "resample": "bicubic", "backend": "pil"},
        "center_crop": {"height": 8, "width": 8},
        "rescale_factor": 1 / 255,
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "input_size": [8, 8],
    }
    assert preprocess_images([Image.new("RGB", (400, 300))], spec).shape == (1, 3, 8, 8)
    with pytest.raises(DataError, match="image 0 of the batch is 2000x1 pixels, more than 50 times"):
        preprocess_images([Image.new("RGB", (2000, 1))], spec)


def _caption_peaks(model: str, paths: list[str], pipe) -> None:
    """In a forked child: ``vlmkit caption`` on one image, then on all; sends the peak resident
    memory (KiB) after each."""
    import resource

    from vlmkit.cli.main import main

    def caption(some: list[str]) -> None:
        sys.argv = ["vlmkit", "caption", *some, "--model", model, "--batch-size", "1"]
        try:
            main()
        except SystemExit as exc:
            assert exc.code in (0, None), exc.code

    caption(paths[:1])  # loads the model, decodes one image: the peak of one
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    caption(paths)
    pipe.send((before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))


def test_caption_memory_stays_flat_over_many_large_images(model, tmp_path, capfd):
    """30 photos of 4 Mpx (12 MB each decoded) at --batch-size 1: the peak resident memory grows by
    about two images over that of one (decoding runs a batch ahead), not by all 30 (360 MB)."""
    import multiprocessing

    import numpy as np

    photo = tmp_path / "photo.jpg"
    ramp = np.linspace(0, 255, 2700, dtype=np.uint8)[None, :, None]
    Image.fromarray(np.broadcast_to(ramp, (1500, 2700, 3)).copy()).save(photo)
    paths = [str(photo)]
    for i in range(29):
        os.link(photo, tmp_path / f"photo{i}.jpg")
        paths.append(str(tmp_path / f"photo{i}.jpg"))
    ctx = multiprocessing.get_context("fork")  # torch is imported already: no start-up cost
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_caption_peaks, args=(str(model), paths, send))
    child.start()
    child.join(120)
    assert child.exitcode == 0 and receive.poll(), capfd.readouterr().err[-3000:]
    before, after = receive.recv()
    assert capfd.readouterr().out.count("\n") == 31  # every image captioned
    grown_mb = (after - before) / 1024
    assert grown_mb < 120, f"peak memory grew by {grown_mb:.0f} MB over 30 images of 12 MB decoded"


def test_a_batch_of_large_images_ends_early(tmp_path, monkeypatch):
    """Batches hold at most ``MAX_BATCH_PIXELS`` (scaled down here: 3 images of 100x100 each)."""
    from vlmkit.evaluate import loop

    monkeypatch.setattr(loop, "MAX_BATCH_PIXELS", 25_000)
    paths = []
    for i, size in enumerate([100, 100, 100, 10, 100, 100]):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (size, size)).save(paths[-1])
    paths.insert(2, tmp_path / "missing.png")
    batches = [([Path(p).name for p, _ in b], [Path(r.path).name for r in f]) for b, f in
               loop.decoded_batches(paths, batch_size=8)]  # fmt: skip
    assert batches == [
        (["0.png", "1.png", "2.png"], ["missing.png"]),
        (["3.png", "4.png", "5.png"], []),
    ]


# ------------------------------------------------------------------------------ values that pass, then raise


@pytest.mark.parametrize(
    "flags, problem",
    [
        (
            ["--sample", "--temperature", "0"],
            "error: sampling needs a temperature above 0, not 0.0; for the most",
        ),
        (
            ["--max-new-tokens", "100000"],
            "error: max_new_tokens 100000: the decoder holds 256 positions and the",
        ),
    ],
)
def test_generation_settings_that_transformers_refuses_are_one_line(model, good, run_main, flags, problem):
    code, err = run_main("caption", good[0], "--model", str(model), *flags)
    assert code == 1
    (line,) = error_lines(err)
    assert line.startswith(problem), line
    if "at most" in line:  # the most it allows does run
        most = line.split("at most ")[1].split()[0]
        assert run_main("caption", good[0], "--model", str(model), "--max-new-tokens", most)[0] == 0


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_temperature_that_is_not_a_finite_number_is_refused_when_read(tmp_path, run_main, value):
    code, err = run_main(
        "caption",
        str(tmp_path / "a.png"),
        "--model",
        str(tmp_path / "model"),
        "--sample",
        "--temperature",
        value,
    )
    assert code == 1
    assert error_lines(err) == ["error: vlmkit caption: temperature: Input should be a finite number"]


def _edit_json(file: Path, edit) -> None:
    data = json.loads(file.read_text())
    edit(data)
    file.write_text(json.dumps(data))


MISMATCHES = {
    "another LoRA rank": ("adapter/adapter_config.json", lambda d: d.update(r=8)),
    "another projection type": ("vlmkit.json", lambda d: d["config"]["projection"].update(type="linear")),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_weights_that_no_longer_fit_the_manifest_are_one_line(model, good, tmp_path, run_main, case):
    import shutil

    name, edit = MISMATCHES[case]
    copy = Path(shutil.copytree(model, tmp_path / "model"))
    _edit_json(copy / name, edit)
    code, err = run_main("caption", good[0], "--model", str(copy))
    assert code == 1
    (line,) = error_lines(err)
    weights = "adapter" if "LoRA" in case else "projection.safetensors"
    assert line.startswith(f"error: {copy / weights} does not fit the model that vlmkit.json describes (")
    assert line.endswith("the folder was changed, or mixed from two models: save or train it again")


# ------------------------------------------------------------------------------ minor


def test_a_32_bit_float_tiff_of_0_to_1_loads_as_grey_not_black(tmp_path):
    import numpy as np

    from vlmkit.core.contracts import CaptionExample

    file = tmp_path / "half.tiff"
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32), "F").save(file)
    image = CaptionExample(id="half", captions=[], image=file).load_image()
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (128, 128, 128)
