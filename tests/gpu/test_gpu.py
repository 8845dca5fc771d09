"""What only a CUDA GPU can show (marker ``gpu``; skipped, with the reason, where none is visible;
``benchmarks/gpu_check.sh`` runs them): training in bf16 and fp16 with ``--eval-metrics``,
gradient checkpointing, captioning and ``load`` on the device, and torchrun with one NCCL process.
Tiny random SigLIP + Llama checkpoints, as in ``tests/train/test_train.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import vlmkit
from vlmkit.cli.main import app
from vlmkit.testing import sample_images, tiny_decoder_checkpoint, tiny_encoder_checkpoint

pytestmark = pytest.mark.gpu

SHAPES = "shapes:size=72,image_size=32"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, vlmkit_home):
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "encoder": tiny_encoder_checkpoint("siglip", root / "siglip", image_size=32),
        "decoder": tiny_decoder_checkpoint("llama", root / "llama"),
    }


def train_args(checkpoints, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--encoder", "siglip", "--encoder-checkpoint", checkpoints["encoder"],
        "--decoder", "smollm", "--decoder-checkpoint", checkpoints["decoder"],
        "--dataset", SHAPES, "--batch-size", "4", "--max-steps", "4",
        "--set", "logging_steps=1", "--set", "max_eval_samples=8", "--set", "eval_every=2",
        "--output", str(out), "--quiet", "--device", "cuda",
        *extra,
    ]  # fmt: skip


def invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("precision", ["bf16", "fp16", "tf32", "auto"])
def test_training_on_cuda_with_eval_metrics(checkpoints, tmp_path, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this card has no bf16")
    out = tmp_path / precision
    invoke(*train_args(checkpoints, out, "--precision", precision, "--eval-metrics"))
    logs = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
    assert any("eval_CIDEr" in r for r in logs)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in logs if "loss" in r)


def test_gradient_checkpointing_trains_on_cuda(checkpoints, tmp_path):
    invoke(*train_args(checkpoints, tmp_path / "ckpt", "--precision", "bf16", "--gradient-checkpointing"))
    assert (tmp_path / "ckpt" / "vlmkit.json").is_file()


def test_load_to_cuda_and_caption_there(checkpoints, tmp_path):
    out = tmp_path / "m"
    invoke(*train_args(checkpoints, out, "--precision", "fp32"))
    images = sample_images(2)
    moved = vlmkit.load(out).to("cuda")
    assert moved.device.type == "cuda" and len(moved.caption(images, max_new_tokens=4)) == 2
    for dtype in ("bfloat16", "float16"):
        placed = vlmkit.load(out, device="cuda", dtype=dtype)
        assert {p.dtype for p in placed.parameters()} == {getattr(torch, dtype)}
        assert len(placed.caption(images, max_new_tokens=4)) == 2
    image = tmp_path / "one.png"
    images[0].save(image)
    result = invoke("caption", "--model", str(out), "--device", "cuda", str(image))
    assert str(image) in result.output
    invoke("eval", "--model", str(out), "--device", "cuda", "--max-samples", "8")


def test_torchrun_one_process_nccl(checkpoints, tmp_path):
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "-m", "vlmkit.cli.main",
        *train_args(checkpoints, out, "--precision", "auto"),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "vlmkit.json").is_file()
