"""Hostile input through the real CLI: each bad file is one ``error:`` line naming it, the exit
code is 1, nothing hangs, and the good work in the same call is kept (the other images captioned).

- images: decompression bombs, a named pipe, a symlink to ``/dev/zero``, a PNG that passes
  ``verify()`` but cannot be decoded, a folder; with ``--model``, ``--json`` and ``--onnx``;
- captions holding a TAB or control characters cannot break the tab-separated output;
- damaged model folders and ONNX exports: one line naming the file and what to do;
- config files and ``--set``/``--dataset`` values that are not what they claim to be.

The model is a tiny SigLIP + GPT-2 saved untrained (its captions do not matter here). The console
script runs in-process under an alarm, so a read that blocks (a named pipe) fails the test
instead of stalling the suite.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from vlmkit.core.model import PrefixConditioningVLM
from vlmkit.testing import sample_images, tiny_decoder_checkpoint, tiny_encoder_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile-model")
    config = {
        "encoder": "siglip",
        "encoder_checkpoint": tiny_encoder_checkpoint("siglip", root / "siglip", image_size=32),
        "decoder": "gpt2",
        "decoder_checkpoint": tiny_decoder_checkpoint("gpt2", root / "gpt2"),
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "max_caption_tokens": 4,
    }
    return PrefixConditioningVLM.build(config).save(root / "model")


@pytest.fixture
def images(tmp_path, hostile_png) -> dict[str, str]:
    """Two good images and one of each hostile kind, by name."""
    paths = {}
    for i, image in enumerate(sample_images(2)):
        paths[f"good{i}"] = tmp_path / f"good{i}.png"
        image.save(paths[f"good{i}"])
    paths["bomb"] = tmp_path / "bomb.png"
    paths["bomb"].write_bytes(hostile_png(20000, 20000, rows=0))
    paths["bomb-warning"] = tmp_path / "bomb-warning.png"  # over Pillow's limit, under twice it
    paths["bomb-warning"].write_bytes(hostile_png(10000, 10000, rows=0))
    paths["cut"] = tmp_path / "cut.png"
    paths["cut"].write_bytes(hostile_png(64, 64, cut=0.5))
    paths["pipe"] = tmp_path / "pipe.jpg"
    os.mkfifo(paths["pipe"])
    paths["zero"] = tmp_path / "zero.jpg"
    paths["zero"].symlink_to("/dev/zero")
    paths["folder"] = tmp_path / "folder.jpg"
    paths["folder"].mkdir()
    return {name: str(path) for name, path in paths.items()}


HOSTILE = ["bomb", "bomb-warning", "cut", "pipe", "zero", "folder"]


@pytest.fixture
def console(monkeypatch, capsys):
    """``console(*args)`` -> (exit code, stdout, stderr): the console script ``main()`` in-process,
    under a 60 s alarm, so a read that blocks (a named pipe) fails the test instead of hanging it."""
    import logging
    import signal
    import warnings

    from vlmkit.cli.main import main

    def alarm(signum, frame):
        raise TimeoutError("vlmkit blocked for 60 s")

    def run(*args: str) -> tuple[int, str, str]:
        logger = logging.getLogger("vlmkit")
        handlers, level = list(logger.handlers), logger.level
        monkeypatch.setattr(sys, "argv", ["vlmkit", *args])
        monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() replaces it
        previous = signal.signal(signal.SIGALRM, alarm)
        signal.alarm(60)
        try:
            with pytest.raises(SystemExit) as exit_info:
                main()
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
            logger.handlers[:] = handlers
            logger.setLevel(level)
        out, err = capsys.readouterr()
        return exit_info.value.code, out, err

    return run


def error_lines(stderr: str) -> list[str]:
    """The ``error:`` lines (stderr also holds ``vlmkit: device ...`` and weight-loading progress)."""
    assert "Traceback" not in stderr and "Warning:" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def check_errors(stderr: str, images: dict[str, str], names: list[str]) -> None:
    """One ``error:`` line per hostile image naming it, nothing else from Python."""
    assert "Traceback" not in stderr and "DecompressionBombWarning" not in stderr, stderr
    errors = [line for line in error_lines(stderr) if line.startswith("error: image ")]
    assert len(errors) == len(names), stderr
    for line, name in zip(errors, names, strict=True):
        assert images[name] in line
    assert stderr.splitlines()[-1] == f"error: {len(names)} of {len(names) + 2} images could not be read"


def test_caption_reports_each_hostile_image_and_captions_the_good_ones(model, images, console):
    order = [images["good0"], *(images[n] for n in HOSTILE), images["good1"]]
    code, out, err = console("caption", *order, "--model", str(model))
    assert code == 1
    assert [line.split("\t")[0] for line in out.splitlines()] == [images["good0"], images["good1"]]
    check_errors(err, images, HOSTILE)
    assert "decompression bomb" in err and "not a regular file" in err


def test_caption_json_reports_hostile_images_in_place(model, images):
    from typer.testing import CliRunner

    from vlmkit.cli.main import app

    order = [images["bomb"], images["good0"], images["pipe"], images["cut"], images["good1"]]
    result = CliRunner().invoke(app, ["caption", *order, "--model", str(model), "--json"])
    assert result.exit_code == 1
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["path"] for r in rows] == order
    assert [r["caption"] is not None for r in rows] == [False, True, False, False, True]
    for row in (rows[0], rows[2], rows[3]):
        assert row["path"] in row["error"] and "\n" not in row["error"]


class FakeOnnxCaptioner:
    """Stands in for ``OnnxCaptioner``: ``--onnx`` reads images through the same loader."""

    def __init__(self, folder, providers=None) -> None:
        self.folder = folder

    def generate(self, images, **kwargs):
        return [f"an image of {img.width}x{img.height}" for img in images]


def test_caption_onnx_reports_hostile_images_and_captions_the_good_ones(
    images, run_main, tmp_path, monkeypatch
):
    import vlmkit.runtime.onnx

    monkeypatch.setattr(vlmkit.runtime.onnx, "OnnxCaptioner", FakeOnnxCaptioner)
    order = [images["good0"], *(images[n] for n in HOSTILE), images["good1"]]
    code, err = run_main("caption", *order, "--onnx", str(tmp_path))
    assert code == 1
    check_errors(err, images, HOSTILE)


class TalkativeModel:
    """A model whose captions hold a TAB, a newline and a terminal escape."""

    def generate(self, images, **kwargs):
        return ["a\tcat\non a mat\x1b[2J\x07" for _ in images]


def test_caption_escapes_tabs_and_control_characters_in_its_tab_separated_output(images, monkeypatch):
    from typer.testing import CliRunner

    import vlmkit
    from vlmkit.cli.main import app

    monkeypatch.setattr(vlmkit, "load", lambda path, **kwargs: TalkativeModel())
    odd = Path(images["good0"]).with_name("tab\there.png")
    shutil.copy(images["good0"], odd)
    result = CliRunner().invoke(app, ["caption", str(odd), images["good1"], "--model", "whatever"])
    assert result.exit_code == 0, result.output
    assert [line.split("\t") for line in result.stdout.splitlines()] == [
        [str(odd).replace("\t", "\\t"), "a\\tcat\\non a mat\\x1b[2J\\x07"],
        [images["good1"], "a\\tcat\\non a mat\\x1b[2J\\x07"],
    ]


# ------------------------------------------------------------------------------ damaged models


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


DAMAGE = {
    "truncated projection": ("projection.safetensors", _truncate, "is damaged"),
    "garbage projection": ("projection.safetensors", lambda f: f.write_bytes(b"\x00" * 64), "is damaged"),
    "truncated adapter weights": ("adapter/adapter_model.safetensors", _truncate, "is damaged"),
    "truncated adapter config": ("adapter/adapter_config.json", _truncate, "is damaged"),
    "deleted adapter weights": ("adapter/adapter_model.safetensors", Path.unlink, "is missing"),
    "deleted projection": ("projection.safetensors", Path.unlink, "is missing"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_model_file_is_one_line_naming_it(model, images, tmp_path, run_main, case):
    name, damage, problem = DAMAGE[case]
    copy = Path(shutil.copytree(model, tmp_path / "model"))
    damage(copy / name)
    code, err = run_main("caption", images["good0"], "--model", str(copy))
    assert code == 1 and "Traceback" not in err
    (line,) = error_lines(err)
    assert line.startswith(f"error: model {copy}: {name} {problem}") and "save the model again" in line


def test_a_manifest_without_config_is_one_line(model, images, tmp_path, run_main):
    copy = Path(shutil.copytree(model, tmp_path / "model"))
    manifest = json.loads((copy / "vlmkit.json").read_text())
    del manifest["config"]
    (copy / "vlmkit.json").write_text(json.dumps(manifest))
    code, err = run_main("caption", images["good0"], "--model", str(copy))
    assert code == 1 and error_lines(err) == [f"error: {copy / 'vlmkit.json'} has no model config; "
                                               "the folder is damaged: train or save it again"]  # fmt: skip


@pytest.fixture
def onnx_export(tmp_path) -> Path:
    """An ONNX export folder that ``OnnxCaptioner`` opens: identity graphs, a 4x2 embedding table."""
    import onnx
    from onnx import TensorProto, helper
    from tokenizers import Tokenizer, models

    folder = tmp_path / "onnx"
    folder.mkdir()
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    for name in ("vision.onnx", "decoder.onnx"):
        onnx.save(helper.make_model(graph), str(folder / name))
    np.save(folder / "embed_tokens.npy", np.zeros((4, 2), dtype=np.float32))
    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(folder / "tokenizer.json"))
    manifest = {
        "format": "vlmkit-onnx",
        "format_version": 1,
        "variants": {"fp32": {"vision": "vision.onnx", "decoder": "decoder.onnx"}},
        "embed_tokens": "embed_tokens.npy",
        "tokenizer": "tokenizer.json",
        "tokens": {"stop_ids": [0], "pad_id": 0},
        "decoder": {"inputs": [], "num_kv_heads": 1, "head_dim": 2, "dtype": "float32"},
    }
    (folder / "vlmkit-onnx.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize("name", ["decoder.onnx", "vision.onnx", "embed_tokens.npy", "tokenizer.json"])
def test_a_damaged_onnx_export_file_is_one_line_naming_it(onnx_export, images, run_main, name):
    from vlmkit.runtime.onnx import OnnxCaptioner

    OnnxCaptioner(onnx_export)  # intact, it opens
    _truncate(onnx_export / name)
    code, err = run_main("caption", images["good0"], "--onnx", str(onnx_export))
    assert code == 1 and "Traceback" not in err
    (line,) = error_lines(err)
    assert line.startswith(f"error: {onnx_export / name} is damaged (") and line.endswith(
        "export the model again"
    )


# ------------------------------------------------------------------------------ config and flags


def config_error(run_main, *args: str) -> str:
    code, err = run_main("train", *args)
    assert code == 1 and "Traceback" not in err, err
    (line,) = error_lines(err)
    return line


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path, run_main):
    config = tmp_path / "run.yaml"
    config.write_bytes("epochs: 2\nprompt: caf\u00e9\n".encode("latin-1"))
    line = config_error(run_main, "--config", str(config))
    assert line == f"error: {config} is not UTF-8 text (byte 21); save it as UTF-8"


def test_an_empty_config_file_is_refused_not_read_as_all_defaults(tmp_path, run_main):
    for text in ("", "# nothing here yet\n"):
        config = tmp_path / "run.yaml"
        config.write_text(text)
        line = config_error(run_main, "--config", str(config))
        assert line == f"error: {config} is empty; write settings in it, or drop --config to use the defaults"


def test_a_config_folder_is_named_as_a_folder(tmp_path, run_main):
    assert "is a folder; pass the YAML file in it" in config_error(run_main, "--config", str(tmp_path))


@pytest.mark.parametrize(
    "flag, value, named",
    [
        ("--set", "epochs=!!python/object/apply:os.system [echo hi]", "--set 'epochs=!!python"),
        ("--set", "model.prompt=!custom x", "--set 'model.prompt=!custom x': the value is not valid YAML"),
        ("--set", "epochs=[1, 2", "--set 'epochs=[1, 2': the value is not valid YAML"),
        ("--set", "epochs={a: b: c}", "--set 'epochs={a: b: c}': the value is not valid YAML"),
        ("--dataset", "folder:path=[unclosed", "the value of 'path' is not valid YAML"),
        ("--dataset", "folder:path=!!python/name:os.system", "the value of 'path' is not valid YAML"),
    ],
)
def test_malformed_or_tagged_yaml_in_a_flag_is_one_line_naming_it(run_main, flag, value, named):
    line = config_error(run_main, flag, value)
    assert named in line
