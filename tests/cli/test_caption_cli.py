"""``vlmkit caption IMAGE... --model PATH``: one caption per image, in order; ``--json`` lines;
unreadable or missing files reported one line each while the others are still captioned.

Runs in-process on a tiny SigLIP + GPT-2 model trained until it gives each test image its own
caption, so the order of the output lines is checked against known captions.
"""

from __future__ import annotations

import json
import random
import sys

import pytest
import torch
from typer.testing import CliRunner

from vlmkit.cli.main import app
from vlmkit.core.errors import ConfigError, VlmkitError
from vlmkit.core.model import PrefixConditioningVLM
from vlmkit.testing import sample_images, tiny_decoder_checkpoint, tiny_encoder_checkpoint

CAPTIONS = ["A red circle on the left.", "Two dogs play in the snow.", "A green square."]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory, fit_captions) -> str:
    """A saved model that captions image i of ``sample_images(3)`` with ``CAPTIONS[i]``."""
    root = tmp_path_factory.mktemp("caption-cli")
    config = {
        "encoder": "siglip",
        "encoder_checkpoint": tiny_encoder_checkpoint("siglip", root / "siglip", image_size=32),
        "decoder": "gpt2",
        "decoder_checkpoint": tiny_decoder_checkpoint("gpt2", root / "gpt2"),
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "max_caption_tokens": 16,
    }
    torch.manual_seed(0)
    vlm = PrefixConditioningVLM.build(config)
    features = vlm.encode(vlm.preprocess(sample_images(3)))
    assert fit_captions(vlm, features, CAPTIONS, max_steps=400), "the tiny model did not learn its captions"
    return str(vlm.save(root / "model"))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("images")
    paths = []
    for i, image in enumerate(sample_images(3)):
        path = root / f"image{i}.png"
        image.save(path)
        paths.append(str(path))
    return paths


@pytest.fixture
def bad_files(tmp_path) -> tuple[str, str]:
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(random.Random(0).randbytes(512))  # random bytes named .jpg
    return str(corrupt), str(tmp_path / "missing.jpg")


def caption(*args: str):
    return CliRunner().invoke(app, ["caption", *args])


def test_prints_one_caption_per_image_in_the_order_given(model, images):
    order = [images[2], images[0], images[1]]
    result = caption(*order, "--model", model)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines == [f"{path}\t{CAPTIONS[int(path[-5])]}" for path in order]
    assert "error" not in result.stderr


def test_json_gives_one_object_per_line(model, images):
    result = caption(*images, "--model", model, "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows == [{"path": p, "caption": c, "error": None} for p, c in zip(images, CAPTIONS, strict=True)]


def test_batch_size_one_gives_the_same_captions(model, images):
    default = caption(*images, "--model", model)
    one_by_one = caption(*images, "--model", model, "--batch-size", "1")
    two = caption(*images, "-m", model, "-b", "2")
    assert default.exit_code == one_by_one.exit_code == two.exit_code == 0
    assert default.stdout == one_by_one.stdout == two.stdout
    assert len(default.stdout.splitlines()) == 3


def test_unreadable_and_missing_files_are_reported_while_the_others_are_captioned(model, images, bad_files):
    corrupt, missing = bad_files
    result = caption(images[0], corrupt, images[1], missing, "--model", model)
    assert result.exit_code == 1
    assert isinstance(result.exception, VlmkitError)
    assert "2 of 4 images could not be read" in str(result.exception)
    assert result.stdout.splitlines() == [f"{images[0]}\t{CAPTIONS[0]}", f"{images[1]}\t{CAPTIONS[1]}"]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2, result.stderr
    assert errors[0] == f"error: image {corrupt!r} is not a readable image (unknown format or corrupt data)"
    assert errors[1] == f"error: image {missing!r}: file not found"  # the path once, not three times


def test_json_reports_bad_files_in_place(model, images, bad_files):
    corrupt, missing = bad_files
    result = caption(corrupt, images[2], missing, "--model", model, "--json")
    assert result.exit_code == 1
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["path"] for r in rows] == [corrupt, images[2], missing]
    assert rows[1] == {"path": images[2], "caption": CAPTIONS[2], "error": None}
    for row in (rows[0], rows[2]):
        assert row["caption"] is None and row["path"] in row["error"] and "\n" not in row["error"]


def test_the_console_script_exits_1_with_one_error_line(model, images, bad_files, monkeypatch, capsys):
    """What a user sees: ``main()`` turns the summary error into ``error: ...``, no traceback."""
    import vlmkit.cli.main as cli

    # main() would also install a stderr log handler and a warnings hook for the whole process
    monkeypatch.setattr(cli, "_log_to_stderr", lambda: None)
    monkeypatch.setattr(cli, "_plugin_warnings_on_one_line", lambda: None)
    monkeypatch.setattr(sys, "argv", ["vlmkit", "caption", images[0], bad_files[1], "--model", model])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"{images[0]}\t{CAPTIONS[0]}"]
    assert err.splitlines()[-1] == "error: 1 of 2 images could not be read"
    assert "Traceback" not in err


def test_a_folder_that_is_not_a_model_is_an_error(images, tmp_path):
    result = caption(images[0], "--model", str(tmp_path))
    assert result.exit_code == 1
    assert "is not a vlmkit model" in str(result.exception)


def test_onnx_provider_cuda_without_the_gpu_runtime_is_a_one_line_error(images, tmp_path, monkeypatch):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    result = caption(images[0], "--onnx", str(tmp_path), "--provider", "cuda")
    assert result.exit_code == 1
    message = str(result.exception)
    assert "no CUDAExecutionProvider" in message and "onnxruntime-gpu" in message and "\n" not in message


def test_onnx_provider_cuda_asks_onnx_runtime_for_cuda_first(monkeypatch):
    import onnxruntime

    from vlmkit.runtime.onnx import execution_providers

    monkeypatch.setattr(
        onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    assert execution_providers("cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert execution_providers("cpu") == ["CPUExecutionProvider"]


def test_provider_is_refused_with_a_torch_model_and_device_with_onnx(images, tmp_path):
    result = caption(images[0], "--model", str(tmp_path), "--provider", "cuda")
    assert isinstance(result.exception, ConfigError)
    assert str(result.exception) == "vlmkit caption: --provider is for --onnx; with --model use --device"
    result = caption(images[0], "--onnx", str(tmp_path), "--device", "cpu")
    assert "--device is for --model; with --onnx use --provider" in str(result.exception)
    result = caption(images[0], "--onnx", str(tmp_path), "--model", str(tmp_path))
    assert "give exactly one of --model PATH or --onnx DIR" in str(result.exception)
