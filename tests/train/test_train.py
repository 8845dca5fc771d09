"""``vlmkit train`` end to end on tiny random models: the artifact, the feature cache, resume after
a crash, what an output folder may hold, early stopping, and bad images in a folder dataset.

The encoder is a tiny SigLIP (32 px, 4x4 patches), the decoder a tiny Llama through the ``smollm``
plugin, the data 72 ``shapes`` images (24 per split). Runs go through the Typer app in-process
(``vlmkit.cli.main.app``) except the one that must die mid-run, which gets its own process.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback
from typer.testing import CliRunner

import vlmkit
from vlmkit.cli.main import app
from vlmkit.core.artifact import MANIFEST
from vlmkit.core.errors import ConfigError, DataError, VlmkitWarning
from vlmkit.core.model import PrefixConditioningVLM
from vlmkit.sdk.datasets import DataWarning
from vlmkit.train import train
from vlmkit.train.config import load_config
from vlmkit.train.trainer import TRAINABLE_FILE

SHAPES = "shapes:size=72,image_size=32"


@pytest.fixture(scope="module")
def home(vlmkit_home):
    """This module's ``VLMKIT_HOME`` (see conftest)."""
    return vlmkit_home


@pytest.fixture(scope="module")
def base_args(checkpoints, home):
    def args(out: Path, *extra: str, dataset: str = SHAPES, steps: int = 4) -> list[str]:
        return [
            "train",
            "--encoder", "siglip", "--encoder-checkpoint", checkpoints["encoder"],
            "--decoder", "smollm", "--decoder-checkpoint", checkpoints["decoder"],
            "--dataset", dataset,
            "--batch-size", "4", "--max-steps", str(steps),
            "--set", "logging_steps=1", "--set", "max_eval_samples=8",
            "--output", str(out), "--quiet",
            *extra,
        ]  # fmt: skip

    return args


def cli(*args: str):
    """``vlmkit ARGS`` through the Typer app; vlmkit's own errors come back as the exception."""
    return CliRunner().invoke(app, list(args))


def cli_ok(*args: str):
    result = cli(*args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result


class EncoderCalls:
    """Counts forward calls of the encoder of every model ``PrefixConditioningVLM.build`` makes."""

    def __init__(self, monkeypatch) -> None:
        self.count = 0
        build = PrefixConditioningVLM.build.__func__

        def counting_build(cls, *args, **kwargs):
            model = build(cls, *args, **kwargs)
            model.encoder.register_forward_hook(lambda *_: setattr(self, "count", self.count + 1))
            return model

        monkeypatch.setattr(PrefixConditioningVLM, "build", classmethod(counting_build))


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def read_logs(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(base_args, tmp_path_factory, home):
    """One tiny run from the CLI; the encoder forward calls it made; the feature cache after it."""
    out = tmp_path_factory.mktemp("runs") / "first"
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("vlmkit")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as mp:
            calls = EncoderCalls(mp)
            result = cli_ok(*base_args(out))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return {
        "out": out,
        "encoder_calls": calls.count,
        "cache": snapshot(home / "features"),
        "result": result,
        "log": messages,
    }


def test_train_reports_the_lora_targets_it_resolved_once(trained):
    lora = [m for m in trained["log"] if m.startswith("LoRA ")]
    assert lora == ["LoRA r=16 on k_proj, o_proj, q_proj, v_proj of the smollm model"]


# ------------------------------------------------------------------------------- the artifact


def test_cli_train_writes_a_loadable_artifact_with_logs_and_run_file(trained, base_args, tmp_path):
    out = trained["out"]
    for name in (MANIFEST, "projection.safetensors", "adapter", "logs.jsonl", "run.yaml", "checkpoints"):
        assert (out / name).exists(), name
    assert not (out / "encoder.safetensors").exists()  # the encoder was frozen: nothing to save

    run = yaml.safe_load((out / "run.yaml").read_text())
    assert run["model"]["encoder"] == "siglip" and run["max_steps"] == 4
    # run.yaml is a valid config file: the run can be repeated from it
    assert load_config(out / "run.yaml").model.decoder == "smollm"

    losses = [r for r in read_logs(out) if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2, 3, 4]
    assert all(r["loss"] > 0 for r in losses)

    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["training"]["global_step"] == 4
    assert manifest["training"]["used_feature_cache"] is True
    assert [d["name"] for d in manifest["training"]["data"]] == ["shapes"]  # and a hub one's revision
    assert "from the feature cache" in " ".join(trained["result"].output.split())  # rich wraps lines

    model = vlmkit.load(out)
    image = model_image(tmp_path)
    assert isinstance(model.caption([image_from(image)], max_new_tokens=4)[0], str)
    result = cli_ok("caption", "--model", str(out), str(image), "--max-new-tokens", "4")
    assert len(result.stdout.splitlines()) == 1 and result.stdout.startswith(f"{image}\t")  # captions alone


def model_image(tmp_path: Path) -> Path:
    from vlmkit.plugins.datasets.shapes import ShapeImage

    path = tmp_path / "red-circle.png"
    ShapeImage(0, "red", "circle", "left", 32)().save(path)
    return path


def image_from(path: Path):
    from PIL import Image

    return Image.open(path).convert("RGB")


# ------------------------------------------------------------------------------- the feature cache


def test_a_second_run_reads_the_feature_cache_and_never_runs_the_encoder(
    trained, base_args, home, tmp_path, monkeypatch
):
    assert trained["encoder_calls"] > 0  # the first run computed the features
    assert len([n for n in trained["cache"] if n.endswith("features.npy")]) == 2  # train + validation
    calls = EncoderCalls(monkeypatch)
    cli_ok(*base_args(tmp_path / "second"))
    assert calls.count == 0
    assert snapshot(home / "features") == trained["cache"]  # read, not rewritten


def test_unfrozen_encoder_layers_run_the_encoder_and_are_saved(base_args, home, tmp_path, monkeypatch):
    out = tmp_path / "unfrozen"
    before = snapshot(home / "features")
    calls = EncoderCalls(monkeypatch)
    cli_ok(*base_args(out, "--unfreeze-encoder-layers", "1", steps=2))
    assert calls.count >= 2  # one forward per training step, at least
    assert snapshot(home / "features") == before  # trainable features are never cached

    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["training"]["used_feature_cache"] is False
    assert manifest["files"]["encoder"] == "encoder.safetensors"
    saved = load_file(str(out / "encoder.safetensors"))
    assert saved and all(".layers.1." in name for name in saved)  # the last of two blocks only

    model = vlmkit.load(out)
    params = dict(model.encoder.named_parameters())
    for name, value in saved.items():
        assert torch.equal(params[name], value), name
    base = PrefixConditioningVLM.build(model.settings.model_copy(update={"unfreeze_encoder_layers": 0}))
    base_params = dict(base.encoder.named_parameters())
    assert any(not torch.equal(base_params[n], v) for n, v in saved.items())  # they did train


# ------------------------------------------------------------------------------- resume


KILLED_RUN = textwrap.dedent(
    """
    import json, os, sys
    from transformers import TrainerCallback
    from vlmkit.train.config import validate_config
    from vlmkit.train import train

    class KillAt(TrainerCallback):
        # a crash, not an exception: no handler, no cleanup, no final save
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == int(sys.argv[2]):
                os._exit(17)

    train(validate_config(json.loads(sys.argv[1])), callbacks=[KillAt()], progress=False)
    """
)


def resume_config(checkpoints, out: Path, **settings) -> dict:
    return {
        "model": {
            "encoder": "siglip",
            "encoder_checkpoint": checkpoints["encoder"],
            "decoder": "smollm",
            "decoder_checkpoint": checkpoints["decoder"],
            "lora": {"dropout": 0.0},  # no randomness outside what the checkpoint restores
        },
        "datasets": [{"name": "shapes", "options": {"size": 72, "image_size": 32}}],
        "output": str(out),
        "max_steps": 6,
        "save_every": 2,
        "batch_size": 4,
        "logging_steps": 1,
        "max_eval_samples": 8,
        **settings,
    }


#: a crash in the first epoch; and one in the second epoch with length-grouped batches (10
#: examples: 3 steps an epoch; checkpoint-4 is one step into epoch 2), whose order must be that
#: epoch's again on resume, not the first epoch's
RESUME_CASES = {
    "first-epoch": ({}, 3, "checkpoint-2"),
    "second-epoch-grouped": (
        {"group_by_length": True, "max_train_samples": 10, "max_steps": 8, "save_every": 4},
        5,
        "checkpoint-4",
    ),
}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_a_killed_run_resumes_from_its_last_checkpoint(checkpoints, home, tmp_path, case, monkeypatch):
    from vlmkit.train.config import validate_config
    from vlmkit.train.data import LengthGroupedSampler

    epochs: list[int] = []  # what the length-grouped sampler is told, in this process
    set_epoch = LengthGroupedSampler.set_epoch
    monkeypatch.setattr(
        LengthGroupedSampler, "set_epoch", lambda self, e: (epochs.append(e), set_epoch(self, e))
    )

    settings, kill_at, last_checkpoint = RESUME_CASES[case]
    out = tmp_path / "killed"
    data = resume_config(checkpoints, out, **settings)
    steps_total = data["max_steps"]
    child = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, json.dumps(data), str(kill_at)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 17, child.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [last_checkpoint]
    assert not (out / MANIFEST).exists()  # a crashed run is not a model

    result = train(validate_config(data), resume=True, progress=False)
    assert result.global_step == steps_total
    if settings.get("group_by_length"):
        assert epochs[0] == 1 and set(epochs) == {1, 2}  # resumed in the second epoch, then the third
        epochs.clear()
    every_step = list(range(1, steps_total + 1))
    # the steps before the checkpoint, then the rest after the crash: nothing trained twice
    assert [r["step"] for r in read_logs(out) if "loss" in r] == every_step
    final = out / "checkpoints" / f"checkpoint-{steps_total}"
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["global_step"] == steps_total
    assert [h["step"] for h in state["log_history"] if "loss" in h] == every_step
    assert vlmkit.load(out).num_prefix_tokens == 16

    # the same run without a crash ends with the same weights: the checkpoint restored the
    # trainable tensors, the optimizer, the schedule and the data order
    whole_out = tmp_path / "whole"
    train(validate_config(resume_config(checkpoints, whole_out, **settings)), progress=False)
    if settings.get("group_by_length"):
        assert set(epochs) == {0, 1, 2}  # a fresh order each epoch
    resumed = load_file(str(final / TRAINABLE_FILE))
    uninterrupted = load_file(str(whole_out / "checkpoints" / f"checkpoint-{steps_total}" / TRAINABLE_FILE))
    assert resumed.keys() == uninterrupted.keys()
    for name, value in resumed.items():
        torch.testing.assert_close(value, uninterrupted[name], rtol=1e-4, atol=1e-5, msg=name)


def test_resuming_with_other_settings_names_what_differs(trained, base_args):
    result = cli(*base_args(trained["out"], "--resume", "--lora-r", "8", "--seed", "3"))
    assert isinstance(result.exception, ConfigError)
    message = str(result.exception)
    assert "model.lora.r" in message and "seed" in message and "\n" not in message
    assert "--overwrite" in message


def test_resuming_with_another_batch_order_is_warned_about(trained):
    from vlmkit.core.errors import VlmkitWarning
    from vlmkit.train import prepare_output_dir

    run = trained["out"] / "run.yaml"
    with pytest.warns(
        VlmkitWarning, match=r"--resume with batch_size: 4 -> 2, group_by_length: false -> true"
    ):
        prepare_output_dir(
            load_config(run, {"batch_size": 2, "group_by_length": True}), resume=True, overwrite=False
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same settings: no warning
        prepare_output_dir(load_config(run), resume=True, overwrite=False)


def test_a_run_of_vlmkit_0_1_resumes_under_the_renamed_keys(trained, tmp_path):
    from vlmkit.train import prepare_output_dir

    saved = yaml.safe_load((trained["out"] / "run.yaml").read_text())
    old = {**saved, "output_dir": saved.pop("output")}
    old["model"] = {("format" if k == "prompt_format" else k): v for k, v in saved["model"].items()}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(old))
    config = load_config(trained["out"] / "run.yaml", {"output": str(tmp_path)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_output_dir(config, resume=True, overwrite=False)  # no "model.format ... differ"


def test_resume_without_a_run_is_refused(trained, base_args, tmp_path):
    result = cli(*base_args(tmp_path / "nothing", "--resume"))
    assert isinstance(result.exception, ConfigError) and "no run to resume" in str(result.exception)

    # a run that died before its first checkpoint: nothing to resume, and the way out is named
    out = tmp_path / "early-death"
    out.mkdir()
    (out / "run.yaml").write_text((trained["out"] / "run.yaml").read_text())
    result = cli(*base_args(out, "--resume"))
    assert isinstance(result.exception, ConfigError), result.output
    assert "holds no complete checkpoint; use --overwrite" in str(result.exception)


def test_resume_after_a_kill_in_the_final_save_or_in_a_checkpoint_write(base_args, tmp_path):
    out = tmp_path / "run"
    args = base_args(out, "--set", "save_every=2", steps=4)  # 4 of an epoch's 6 steps: ends mid-epoch
    cli_ok(*args)
    logged = [r["loss"] for r in read_logs(out) if "loss" in r]

    # killed during the final save (the manifest goes first): nothing is left to train, and no
    # step 5 either (transformers, resumed at max_steps mid-epoch, would step once more)
    (out / MANIFEST).unlink()
    result = cli_ok(*args, "--resume")
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["training"]["global_step"] == 4
    assert manifest["training"]["train_loss"] == pytest.approx(sum(logged) / len(logged))
    assert "final train loss" in result.stderr and "nan" not in result.stderr
    assert [r["step"] for r in read_logs(out) if "loss" in r] == [1, 2, 3, 4]

    # killed while writing checkpoint-4: resume passes over it, says so, and trains steps 3-4 again
    (out / "checkpoints" / "checkpoint-4" / "trainer_state.json").unlink()
    with pytest.warns(VlmkitWarning, match=r"checkpoint-4 is incomplete \(trainer_state.json missing"):
        cli_ok(*args, "--resume")
    state = json.loads((out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    # the killed run's records of steps 3-4 are dropped on resume: each step is logged once
    assert [r["step"] for r in read_logs(out) if "loss" in r] == [1, 2, 3, 4]


# ------------------------------------------------------------------------------- output folders


def test_a_folder_holding_another_run_is_refused_and_left_untouched(trained, base_args):
    before = snapshot(trained["out"])
    for extra in ((), ("--lora-r", "4")):
        result = cli(*base_args(trained["out"], *extra))
        assert isinstance(result.exception, ConfigError)
        message = str(result.exception)
        assert "already holds a run" in message and "--resume" in message and "--overwrite" in message
    assert snapshot(trained["out"]) == before


def test_overwrite_replaces_a_previous_run(base_args, tmp_path):
    out = tmp_path / "old"
    (out / "checkpoints" / "checkpoint-50").mkdir(parents=True)
    (out / "run.yaml").write_text("seed: 7\n")
    (out / "logs.jsonl").write_text('{"step": 50, "loss": 9.0}\n')
    cli_ok(*base_args(out, "--overwrite", steps=2))
    assert not (out / "checkpoints" / "checkpoint-50").exists()
    assert [r["step"] for r in read_logs(out) if "loss" in r] == [1, 2]
    assert yaml.safe_load((out / "run.yaml").read_text())["seed"] == 0
    assert (out / MANIFEST).is_file()


def test_a_folder_that_is_not_a_vlmkit_run_is_refused_even_with_overwrite(base_args, tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"precious")
    for extra in ((), ("--overwrite",)):
        result = cli(*base_args(out, *extra))
        assert isinstance(result.exception, ConfigError), result.output
        assert "holds no vlmkit run" in str(result.exception)
    assert sorted(p.name for p in out.iterdir()) == ["holiday.jpg"]


# ------------------------------------------------------------------------------- early stopping


def test_early_stopping_evaluates_and_keeps_the_best_checkpoint(base_args, tmp_path, monkeypatch):
    from vlmkit.train.trainer import VLMTrainer

    # Whether a validation loss rises within 12 steps depends on the CPU's arithmetic (it kept
    # falling on one machine with learning rates of 2 and 0.5): make it rise after the second
    # evaluation, so what is tested is ours (stopping, keeping the best checkpoint), not numerics.
    evaluation_loop = VLMTrainer.evaluation_loop

    def worsening(self, *args, **kwargs):
        output = evaluation_loop(self, *args, **kwargs)
        if self.state.global_step > 4:
            output.metrics["eval_loss"] += self.state.global_step
        return output

    monkeypatch.setattr(VLMTrainer, "evaluation_loop", worsening)
    out = tmp_path / "early"
    cli_ok(*base_args(out, "--eval-every", "2", "--early-stopping-patience", "1", steps=12))
    evals = [r for r in read_logs(out) if "eval_loss" in r]
    assert len(evals) >= 2
    stopped = json.loads((out / MANIFEST).read_text())["training"]["global_step"]
    assert stopped < 12  # it stopped early
    last = max(int(p.name.split("-")[1]) for p in (out / "checkpoints").iterdir())
    state = json.loads((out / "checkpoints" / f"checkpoint-{last}" / "trainer_state.json").read_text())
    assert len({r["step"] for r in evals}) == len(evals)  # the end reuses the last evaluation
    best_loss = min(r["eval_loss"] for r in evals)
    assert state["best_metric"] == pytest.approx(best_loss)
    best = Path(state["best_model_checkpoint"])
    assert best.is_dir()  # save_total_limit never deletes the best checkpoint

    # the artifact holds the best checkpoint's weights, not the last step's
    kept = load_file(str(best / TRAINABLE_FILE))
    saved = load_file(str(out / "projection.safetensors"))
    for name, value in saved.items():
        assert torch.equal(kept[f"projection.{name}"], value), name
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["training"]["eval"]["eval_loss"] == pytest.approx(best_loss, rel=1e-4)
    # the final evaluation is logged with the others, not into a stray checkpoints/runs/
    assert (
        sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith("checkpoint-")) == []
    )
    assert len(list((out / "tensorboard").iterdir())) >= 1


def test_early_stopping_needs_checkpoints_at_evaluations(base_args, tmp_path):
    result = cli(
        *base_args(
            tmp_path / "x", "--eval-every", "2", "--early-stopping-patience", "1", "--set", "save_every=3"
        )
    )
    assert isinstance(result.exception, ConfigError) and "multiple of eval_every" in str(result.exception)


# ------------------------------------------------------------------------------- bad images


@pytest.fixture
def photo_folder(tmp_path):
    """A folder dataset of 30 good PNGs, one corrupt file and one captioned file that is missing."""
    from vlmkit.plugins.datasets.shapes import ShapeImage

    folder = tmp_path / "photos"
    folder.mkdir()
    lines = []
    for i in range(30):
        color, shape = ("red", "blue")[i % 2], ("circle", "square", "triangle")[i % 3]
        ShapeImage(i, color, shape, "left", 32)().save(folder / f"img{i:02d}.png")
        lines.append({"file_name": f"img{i:02d}.png", "caption": f"A {color} {shape} on the left."})
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    lines += [
        {"file_name": "broken.png", "caption": "A broken file."},
        {"file_name": "gone.png", "caption": "A missing file."},
    ]
    (folder / "captions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


def test_bad_images_stop_the_run_in_one_line_naming_them_and_skip_trains(
    base_args, home, photo_folder, tmp_path, run_main
):
    out, cache = tmp_path / "run", tmp_path / "cache"
    code, err = run_main(*base_args(out, "--cache-dir", str(cache), dataset=f"folder:path={photo_folder}"))
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert "broken.png" in lines[0] and "gone.png" in lines[0] and "on_bad_image=skip" in lines[0]
    assert "Traceback" not in err

    # the failed start left no run behind: the same command with skip needs no --overwrite
    with pytest.warns(DataWarning, match=r"2 of 32 images skipped \(1 missing: gone.png; 1 unreadable"):
        cli_ok(
            *base_args(
                out,
                "--cache-dir",
                str(cache),
                dataset=f"folder:path={photo_folder},on_bad_image=skip",
                steps=2,
            )
        )
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["training"]["global_step"] == 2
    # the usable images' checks are remembered in the run's cache folder, not in VLMKIT_HOME
    stores = [json.loads(f.read_text()) for f in (cache / "image-checks").glob("*.json")]
    assert [s["folder"] for s in stores] == [str(photo_folder.resolve())]
    assert len(stores[0]["images"]) == 30
    in_home = [json.loads(f.read_text())["folder"] for f in (home / "image-checks").glob("*.json")]
    assert str(photo_folder.resolve()) not in in_home


def test_every_bad_image_is_listed_in_the_run_folder_before_any_weights_load(
    base_args, photo_folder, tmp_path, monkeypatch
):
    for i in range(0, 14, 2):
        (photo_folder / f"img{i:02d}.png").write_bytes(b"junk")
    out = tmp_path / "run"

    def no_weights_yet(*args, **kwargs):
        raise AssertionError("the model was built before the data was checked")

    with monkeypatch.context() as mp:
        mp.setattr(PrefixConditioningVLM, "build", no_weights_yet)
        result = cli(*base_args(out, dataset=f"folder:path={photo_folder}"))
    assert isinstance(result.exception, DataError), result.exception
    assert str(result.exception).endswith(f"all 9 are listed in {out / 'bad_images.tsv'}")
    listed = (out / "bad_images.tsv").read_text().splitlines()
    assert listed[0] == "image\tproblem" and len(listed) == 10
    assert "gone.png\tmissing" in listed and "img12.png\tis not a readable image" in "\n".join(listed)

    # the folder holds only the list: the corrected command needs no --overwrite
    skip = f"folder:path={photo_folder},on_bad_image=skip"
    with pytest.warns(DataWarning, match="9 of 32 images skipped"):
        cli_ok(*base_args(out, dataset=skip, steps=1))
    assert len((out / "bad_images.tsv").read_text().splitlines()) == 10

    # skipping or refusing bad images is not another run: resuming with the other is warned about
    from vlmkit.core.errors import VlmkitWarning
    from vlmkit.train import prepare_output_dir

    refuse = [{"name": "folder", "options": {"path": str(photo_folder), "on_bad_image": "error"}}]
    with pytest.warns(VlmkitWarning, match=r"datasets.0.options.on_bad_image: \"skip\" -> \"error\""):
        prepare_output_dir(load_config(out / "run.yaml", {"datasets": refuse}), resume=True, overwrite=False)


def test_a_dataset_error_is_a_data_error(base_args, tmp_path):
    result = cli(*base_args(tmp_path / "run", dataset=f"folder:path={tmp_path / 'nowhere'}"))
    assert isinstance(result.exception, DataError) and "no such folder" in str(result.exception)


# ------------------------------------------------------------------------------- length grouping


@pytest.fixture
def varied_folder(tmp_path):
    """48 images whose captions run from 2 to 17 words, in a shuffled order."""
    import random

    from vlmkit.plugins.datasets.shapes import ShapeImage

    folder = tmp_path / "varied"
    folder.mkdir()
    words = [f"word{n:02d}" for n in range(16)]
    counts = [1 + i % 16 for i in range(48)]
    random.Random(0).shuffle(counts)
    lines = []
    for i, count in enumerate(counts):
        ShapeImage(i, "red", "circle", "left", 32)().save(folder / f"img{i:02d}.png")
        caption = " ".join([f"n{i:02d}", *words[:count]])  # unique, and as varied in length
        lines.append({"file_name": f"img{i:02d}.png", "caption": caption})
    (folder / "captions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


def padding_of_batches(base_args, folder, out, monkeypatch, *flags) -> tuple[int, list[str]]:
    """Characters of padding a run's batches carry (sum over batches of longest - each), and every
    caption it trained on."""
    from vlmkit.train.data import Collator

    seen: list[list[str]] = []
    collate = Collator.__call__

    def recording(self, items):
        seen.append([it["caption"] for it in items])
        return collate(self, items)

    monkeypatch.setattr(Collator, "__call__", recording)
    cli_ok(*base_args(out, *flags, dataset=f"folder:path={folder}", steps=6))
    monkeypatch.setattr(Collator, "__call__", collate)
    train_batches = seen[:6]  # evaluation batches come after
    padding = sum(max(map(len, b)) * len(b) - sum(map(len, b)) for b in train_batches)
    return padding, [c for b in train_batches for c in b]


def test_group_by_length_batches_similar_captions_and_still_sees_each_once(
    base_args, varied_folder, tmp_path, monkeypatch
):
    grouped, grouped_seen = padding_of_batches(
        base_args, varied_folder, tmp_path / "a", monkeypatch, "--group-by-length"
    )
    mixed, mixed_seen = padding_of_batches(base_args, varied_folder, tmp_path / "b", monkeypatch)
    # 24 of the ~38 training examples in 6 steps, none twice within the epoch, either way
    assert len(set(grouped_seen)) == len(set(mixed_seen)) == 24
    # transformers sorts groups of len // (4 * batch) batches, at most 50: on this 38-example split
    # that is 2 batches at a time (on a large dataset, 50), so the gain here is the smallest kind
    assert grouped < mixed / 1.5, (grouped, mixed)
    assert yaml.safe_load((tmp_path / "a" / "run.yaml").read_text())["group_by_length"] is True
    assert yaml.safe_load((tmp_path / "b" / "run.yaml").read_text())["group_by_length"] is False  # default


def sampler_batches(captions: list[str], batch: int) -> list[list[str]]:
    from vlmkit.core.contracts import CaptionExample
    from vlmkit.sdk.datasets import ListDataset
    from vlmkit.train.data import CaptionTrainingSet, LengthGroupedSampler

    data = CaptionTrainingSet(
        ListDataset(
            [CaptionExample(id=str(i), captions=[c], image=None) for i, c in enumerate(captions)], "x"
        )
    )
    order = list(LengthGroupedSampler(data, batch, seed=0))
    assert sorted(order) == list(range(len(captions)))  # every example once
    return [[captions[i] for i in order[k : k + batch]] for k in range(0, len(order), batch)]


def test_captions_of_nearly_equal_length_stay_shuffled_not_sorted_into_classes():
    """Shapes captions are 25-31 characters and their length follows their words: sorting by exact
    length would make each batch one or two classes (that cost the demo 37 points of exact match)."""
    from vlmkit.core.registry import get_registry

    split = get_registry().dataset("shapes").load("train", {"size": 1200})  # the demo's data
    captions = [example.captions[0] for example in split]
    assert len({len(c) for c in captions}) > 3 and len(set(captions)) == 24
    batches = sampler_batches(captions, 16)
    distinct = [len(set(b)) for b in batches]
    assert sum(distinct) / len(distinct) > 8, distinct  # of 16 rows, ~10 classes as by chance


def test_captions_of_very_different_length_are_batched_together():
    import random

    rng = random.Random(0)
    captions = [" ".join(["word"] * rng.randint(3, 60)) for _ in range(1600)]

    def padding(batches):
        return sum(max(map(len, b)) * len(b) - sum(map(len, b)) for b in batches)

    shuffled = [captions[k : k + 16] for k in range(0, len(captions), 16)]
    assert padding(sampler_batches(captions, 16)) < padding(shuffled) / 5


def test_the_grouped_order_depends_on_the_seed_and_epoch_only():
    from vlmkit.core.contracts import CaptionExample
    from vlmkit.sdk.datasets import ListDataset
    from vlmkit.train.data import CaptionTrainingSet, LengthGroupedSampler

    captions = [" ".join(["word"] * (3 + i % 40)) for i in range(400)]
    data = CaptionTrainingSet(
        ListDataset(
            [CaptionExample(id=str(i), captions=[c], image=None) for i, c in enumerate(captions)], "x"
        )
    )

    def order(seed: int, epoch: int) -> list[int]:
        sampler = LengthGroupedSampler(data, 8, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 1) == order(0, 1)  # what a resumed run replays
    assert order(0, 1) != order(0, 0) and order(1, 0) != order(0, 0)


def test_training_draws_one_bar_and_prints_no_raw_log_records(base_args, tmp_path, monkeypatch):
    import vlmkit.train.trainer as trainer_module

    # the bar is drawn where stderr is a terminal; here it is captured
    monkeypatch.setattr(
        trainer_module, "progress_bar", functools.partial(trainer_module.progress_bar, enabled=True)
    )
    monkeypatch.setenv("COLUMNS", "200")
    out = tmp_path / "bar"
    result = cli_ok(*[a for a in base_args(out) if a != "--quiet"])
    assert "{'loss'" not in result.output and "grad_norm" not in result.output  # Trainer's raw dicts
    (bar,) = [line for line in result.output.splitlines() if line.startswith("training")]
    assert re.search(r" 4/4 loss \d+\.\d{4} lr \d\.\d\de-\d\d \d+\.\d samples/s ", bar), bar
    assert [r["step"] for r in read_logs(out) if "loss" in r] == [1, 2, 3, 4]  # the records: logs.jsonl


class EncoderPlace(TrainerCallback):
    """Where the encoder is while training steps: a submodule of the trained model, and its device."""

    def __init__(self) -> None:
        self.seen: list[tuple[bool, str, bool]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        vlm = model.module if hasattr(model, "module") else model
        names = {n for n, _ in vlm.named_parameters()}
        device = next(vlm.encoder.parameters()).device.type
        self.seen.append(
            ("encoder" in dict(vlm.named_children()), device, any(n.startswith("encoder.") for n in names))
        )


def test_training_from_cached_features_keeps_the_encoder_out_of_the_trained_model(
    checkpoints, home, tmp_path
):
    """The encoder never runs while training reads cached features: it is not moved to the device,
    replicated by DDP or sharded and gathered by FSDP; the saved model has it back."""
    from vlmkit.train.config import TrainConfig

    config = TrainConfig(
        model={"encoder": "siglip", "encoder_checkpoint": checkpoints["encoder"], "decoder": "smollm",
               "decoder_checkpoint": checkpoints["decoder"]},
        datasets=[{"name": "shapes", "options": {"size": 72, "image_size": 32}}],
        batch_size=4, max_steps=2, output=tmp_path / "aside", eval_metrics=True, max_eval_samples=4,
    )  # fmt: skip
    place = EncoderPlace()
    result = train(config, callbacks=[place], progress=False)
    assert result.used_feature_cache and "eval_CIDEr" in result.eval_metrics  # captions from features
    assert place.seen == [(False, "cpu", False)] * 2
    model = vlmkit.load(tmp_path / "aside")
    assert model.encoder is not None and "encoder" in dict(model.named_children())
