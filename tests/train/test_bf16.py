"""A run in bf16 (``auto`` on a CPU with AMX, and on every recent GPU) is as proven as one in fp32:
it shares the feature cache with fp32 runs, resumes in its own precision to the weights of an
uninterrupted run, and its model loads, captions and exports in fp32 with no "encoder differs".

These pin bf16 explicitly (``--precision bf16``, or ``auto`` with ``pin_cpu_precision("bf16")``
where the point is what ``auto`` does), with tiny models, so they are cheap even where bf16 is
emulated (CPUs without AVX512-BF16 or AMX).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_train import (
    KILLED_RUN,
    EncoderCalls,
    base_args,
    home,
    model_image,
    resume_config,
    snapshot,
)

import vlmkit
from vlmkit.core.artifact import MANIFEST
from vlmkit.core.errors import ConfigError
from vlmkit.core.placement import CPU_PRECISION_ENV
from vlmkit.train import train
from vlmkit.train.config import validate_config
from vlmkit.train.distributed import PLACEMENT_FILE
from vlmkit.train.trainer import TRAINABLE_FILE

__all__ = ["base_args", "home"]  # module fixtures shared with test_train (checkpoints: conftest)

DIFFERS = "differs from the one model"


def config(checkpoints, out: Path, **settings) -> dict:
    """test_train's resume run (6 steps, a checkpoint every 2, no LoRA dropout), 4 steps by default."""
    return resume_config(checkpoints, out, **{"max_steps": 4, "max_eval_samples": 4, **settings})


@pytest.fixture(scope="module")
def bf16_run(checkpoints, home, tmp_path_factory):
    """A tiny run in bf16; the encoder calls it made."""
    out = tmp_path_factory.mktemp("bf16") / "run"
    with pytest.MonkeyPatch.context() as mp:
        calls = EncoderCalls(mp)
        train(validate_config(config(checkpoints, out, precision="bf16")), progress=False)
    return {"out": out, "encoder_calls": calls.count}


def test_a_bf16_run_records_its_precision_in_the_run_and_each_checkpoint(bf16_run):
    out = bf16_run["out"]
    expected = {"device_type": "cpu", "precision": "bf16"}
    assert json.loads((out / PLACEMENT_FILE).read_text()) == expected
    for checkpoint in (out / "checkpoints").iterdir():
        assert json.loads((checkpoint / PLACEMENT_FILE).read_text()) == expected
    assert json.loads((out / MANIFEST).read_text())["training"]["placement"] == expected


def test_runs_in_bf16_and_fp32_share_one_feature_cache(bf16_run, checkpoints, home, tmp_path, monkeypatch):
    assert bf16_run["encoder_calls"] > 0  # the bf16 run computed the features
    before = snapshot(home / "features")
    calls = EncoderCalls(monkeypatch)
    train(
        validate_config(config(checkpoints, tmp_path / "fp32", precision="fp32", max_steps=1)), progress=False
    )
    assert calls.count == 0  # read from the entry the bf16 run wrote
    assert snapshot(home / "features") == before


def test_a_bf16_model_loads_in_fp32_and_bf16_with_no_encoder_warning(bf16_run, tmp_path, caplog):
    image = model_image(tmp_path)
    from PIL import Image

    with caplog.at_level(logging.WARNING):
        fp32 = vlmkit.load(bf16_run["out"])
        bf16 = vlmkit.load(bf16_run["out"], dtype="bfloat16")
    assert not [r for r in caplog.records if DIFFERS in r.getMessage()]
    assert next(fp32.encoder.parameters()).dtype == torch.float32
    assert next(bf16.encoder.parameters()).dtype == torch.bfloat16
    assert fp32.encoder.fingerprint() == bf16.encoder.fingerprint()
    for model in (fp32, bf16):  # generation runs in either precision
        (caption,) = model.caption([Image.open(image).convert("RGB")], max_new_tokens=4)
        assert isinstance(caption, str)


def test_a_really_changed_encoder_still_warns(checkpoints, home, tmp_path, caplog):
    encoder = tmp_path / "siglip"
    shutil.copytree(checkpoints["encoder"], encoder)
    out = tmp_path / "run"
    settings = config(checkpoints, out, precision="bf16", max_steps=1)
    settings["model"]["encoder_checkpoint"] = str(encoder)
    train(validate_config(settings), progress=False)
    (weights,) = encoder.glob("*.safetensors")
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 0.5  # fine-tuned elsewhere, say
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING):
        vlmkit.load(out, dtype="bfloat16")
    assert [r for r in caplog.records if DIFFERS in r.getMessage()]


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch.onnx's own notes on tracing
def test_a_bf16_model_exports_with_no_encoder_warning(bf16_run, tmp_path, caplog):
    pytest.importorskip("onnxruntime", reason="export needs the onnx extra (make test installs it)")
    from vlmkit.export import export_model

    with caplog.at_level(logging.WARNING):
        result = export_model(bf16_run["out"], tmp_path / "onnx", format="onnx")
    assert not [r for r in caplog.records if DIFFERS in r.getMessage()]
    assert result is not None and (tmp_path / "onnx").is_dir()


def test_a_killed_bf16_run_resumes_in_bf16_to_the_uninterrupted_weights(checkpoints, home, tmp_path):
    """The run starts where ``auto`` is bf16 (an AMX Xeon, a GPU), dies, and resumes where ``auto``
    would be fp32 (this test session): it continues in its recorded bf16. Its trainable tensors
    then equal an uninterrupted bf16 run's exactly: the frozen bf16 weights, the restored fp32
    LoRA/projection and optimizer state and the same data order give the same operations in the
    same order, and the CPU's bf16 kernels are deterministic. (bf16 itself does not widen the
    tolerance: its rounding is the same in both runs.)"""
    out = tmp_path / "killed"
    data = config(checkpoints, out, precision="auto")
    child = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, json.dumps(data), "3"],
        env={**os.environ, "OMP_NUM_THREADS": "1", CPU_PRECISION_ENV: "bf16"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 17, child.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2"]

    assert os.environ[CPU_PRECISION_ENV] == "fp32"  # here auto would train in fp32
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the child: the same kernels, the same sums
    try:
        result = train(validate_config(data), resume=True, progress=False)
        assert result.global_step == 4
        manifest = json.loads((out / MANIFEST).read_text())
        assert manifest["training"]["placement"]["precision"] == "bf16"

        whole = tmp_path / "whole"
        train(validate_config(config(checkpoints, whole, precision="bf16")), progress=False)
    finally:
        torch.set_num_threads(threads)
    resumed = load_file(str(out / "checkpoints" / "checkpoint-4" / TRAINABLE_FILE))
    uninterrupted = load_file(str(whole / "checkpoints" / "checkpoint-4" / TRAINABLE_FILE))
    assert resumed.keys() == uninterrupted.keys()
    for name, value in resumed.items():
        torch.testing.assert_close(value, uninterrupted[name], rtol=0, atol=0, msg=name)


def test_resuming_a_bf16_run_in_another_precision_is_refused(bf16_run, checkpoints):
    data = config(checkpoints, bf16_run["out"], precision="fp32")
    with pytest.raises(ConfigError, match="was trained in bf16; resume it in bf16") as info:
        train(validate_config(data), resume=True, progress=False)
    assert "\n" not in str(info.value)
