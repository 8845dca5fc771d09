"""Hostile runs of ``vlmkit train`` through the console script: a run that diverges, feature-cache
files that were tampered with, two runs into one folder, captions that spell control tokens.

Tiny SigLIP (32 px) + tiny Llama (``smollm`` plugin), 72 ``shapes`` images, 4 steps; in-process
(``run_main``) except where two processes must meet.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from vlmkit.testing import tiny_decoder_checkpoint, tiny_encoder_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPES = "shapes:size=72,image_size=32"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "encoder": tiny_encoder_checkpoint("siglip", root / "siglip", image_size=32),
        "decoder": tiny_decoder_checkpoint("llama", root / "llama"),
    }


@pytest.fixture(scope="module")
def train_args(checkpoints, vlmkit_home):
    def args(out: Path, *extra: str, dataset: str = SHAPES, steps: int = 4) -> list[str]:
        return [
            "train",
            "--encoder", "siglip", "--encoder-checkpoint", checkpoints["encoder"],
            "--decoder", "smollm", "--decoder-checkpoint", checkpoints["decoder"],
            "--dataset", dataset,
            "--batch-size", "4", "--max-steps", str(steps),
            "--set", "max_eval_samples=8",
            "--output", str(out), "--quiet",
            *extra,
        ]  # fmt: skip

    return args


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


# ------------------------------------------------------------------------------ divergence


@pytest.mark.parametrize("lr", ["1e30", "1e38"])
def test_a_diverging_run_stops_in_one_line_saves_no_model_and_keeps_only_finite_checkpoints(
    train_args, run_main, tmp_path, lr
):
    out = tmp_path / "run"
    code, err = run_main(*train_args(out, "--lr-lora", lr, "--lr-projection", lr, "--set", "save_every=1"))
    assert code == 1, err
    (line,) = error_lines(err)
    assert line.startswith("error: training diverged at step "), line
    assert "no model was saved" in line and "--overwrite" in line
    assert not (out / "vlmkit.json").exists() and not (out / "adapter").exists()
    for checkpoint in (out / "checkpoints").glob("checkpoint-*"):
        tensors = load_file(checkpoint / "trainable.safetensors")
        assert all(t.isfinite().all() for t in tensors.values()), checkpoint
    kept = sorted((out / "checkpoints").glob("checkpoint-*"))
    if kept:
        assert str(kept[-1]) in line
