"""``torchrun --nproc_per_node 2 vlmkit train`` on CPU (gloo), as a user launches it.

Two processes share one feature cache: rank 0 computes each entry while rank 1 waits on its file
lock, then both train from it; only rank 0 writes logs and the artifact.
"""

from __future__ import annotations

import json

import pytest

import vlmkit
from vlmkit.core.artifact import MANIFEST
from vlmkit.testing import tiny_decoder_checkpoint, tiny_encoder_checkpoint

TIMEOUT_S = 300


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    return {
        "root": root,
        "home": root / "home",
        "encoder": tiny_encoder_checkpoint("siglip", root / "siglip", image_size=32),
        "decoder": tiny_decoder_checkpoint("llama", root / "llama"),
    }


def run_torchrun(torchrun, setup, *args: str):
    return torchrun(
        "-m", "vlmkit.cli.main", *args, env={"VLMKIT_HOME": str(setup["home"])}, timeout=TIMEOUT_S
    )


def train_args(setup, out, *extra: str) -> list[str]:
    return [
        "train",
        "--encoder", "siglip", "--encoder-checkpoint", setup["encoder"],
        "--decoder", "smollm", "--decoder-checkpoint", setup["decoder"],
        "--dataset", "shapes:size=72,image_size=32",
        "--batch-size", "4", "--max-steps", "4", "--set", "logging_steps=1",
        "--output", str(out), "--quiet",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(torchrun, setup):
    out = setup["root"] / "run"
    run = run_torchrun(torchrun, setup, *train_args(setup, out))
    assert run.returncode == 0, run.stderr[-4000:]
    return out, run


def test_two_process_training_caches_features_once_and_saves_a_loadable_model(setup, trained):
    out, run = trained

    # each split's features were computed once, half by each rank: one entry each
    entries = sorted(p for p in (setup["home"] / "features").iterdir() if p.is_dir())
    assert len(entries) == 2, entries  # train, validation
    assert not [p for p in entries if p.name.endswith(".partial")]
    for half in ("images 0..11 into", "images 12..23 into"):  # 24 images per split
        assert run.stderr.count(f"feature cache: computing {half}") == 2, run.stderr[-4000:]
    for entry in entries:
        assert json.loads((entry / "meta.json").read_text())["complete"] is True

    # rank 0 alone logs: every step once (two ranks appending would repeat them)
    records = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["training"]["global_step"] == 4 and manifest["training"]["used_feature_cache"]
    # 24 training images, 4 per step and rank: 3 steps make an epoch of two ranks
    assert [r for r in records if "train_loss" in r][0]["epoch"] == pytest.approx(4 / 3)

    assert run.stderr.count("model saved to") == 1  # the report comes from rank 0 only
    model = vlmkit.load(out)
    assert model.num_prefix_tokens == 16


def test_every_rank_refuses_a_folder_holding_another_run(torchrun, setup, trained):
    # rank 0 checks the folder and tells the others: none is left waiting at a barrier for a
    # rank that has gone (torchrun would kill it; other launchers might leave it hanging)
    out, _ = trained
    again = run_torchrun(torchrun, setup, *train_args(setup, out))
    assert again.returncode != 0
    refusals = [line for line in again.stderr.splitlines() if line.startswith("error: ")]
    assert len(refusals) == 2 and all("already holds a run" in line for line in refusals), again.stderr[
        -4000:
    ]
    assert (out / MANIFEST).is_file()
