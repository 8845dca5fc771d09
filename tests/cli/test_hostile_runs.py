"""Hostile runs of ``vlmkit train`` through the console script: a run that diverges, feature-cache
files that were tampered with, two runs into one folder, captions that spell control tokens.

Tiny SigLIP (32 px) + tiny Llama (``smollm`` plugin), 72 ``shapes`` images, 4 steps; in-process
(``run_main``) except where two processes must meet.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from vlmkit.testing import tiny_decoder_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPES = "shapes:size=72,image_size=32"


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


# ------------------------------------------------------------------------------ writes


def _private_tmpfs(path: Path, size_kb: int) -> None:
    """In this forked (single-threaded) process: a user and mount namespace of its own with a
    tmpfs of ``size_kb`` KiB at ``path`` (no privileges needed where user namespaces are on)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(0x10000000 | 0x00020000) != 0:  # CLONE_NEWUSER | CLONE_NEWNS
        raise OSError(ctypes.get_errno(), "unshare")
    Path("/proc/self/setgroups").write_text("deny")
    Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
    Path("/proc/self/gid_map").write_text(f"0 {gid} 1")
    libc.mount(b"none", b"/", None, 0x4000 | 0x40000, None)  # MS_REC | MS_PRIVATE: nothing leaks out
    if libc.mount(b"tmpfs", str(path).encode(), b"tmpfs", 0, f"size={size_kb}k".encode()) != 0:
        raise OSError(ctypes.get_errno(), "mount tmpfs")


def _train_on_a_full_disk(args: list[str], tiny: Path, pipe) -> None:
    from vlmkit.cli.main import main  # noqa: F401 - imported before the disk is filled

    try:
        _private_tmpfs(tiny, 256)
    except OSError as exc:
        pipe.send(("unavailable", str(exc)))
        return
    (tiny / "fill").write_bytes(b"\0" * 60 * 4096)  # 16 KiB left; the features take 24 KiB
    pipe.send(_console(args)[0])


def test_a_full_disk_while_caching_features_is_one_line_not_sigbus(train_args, tmp_path):
    """The feature cache on a file system with too little room (a private 256 KiB tmpfs): one line
    naming the file, exit 1; a sparse memory-mapped file would die of SIGBUS instead."""
    import multiprocessing

    tiny = tmp_path / "tiny"
    tiny.mkdir()
    args = train_args(tmp_path / "run", "--cache-dir", str(tiny / "cache"), steps=1)
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_train_on_a_full_disk, args=(args, tiny, send))
    child.start()
    child.join(120)
    assert child.exitcode == 0, f"the child died (exit code {child.exitcode}: -7 is SIGBUS)"
    code, err = receive.recv()
    if code == "unavailable":
        pytest.skip(f"no private tmpfs here (user namespaces off?): {err}")
    assert code == 1, err
    (line,) = error_lines(err)
    assert line.startswith(f"error: cannot write {tiny / 'cache'}/") and "No space left on device" in line
    assert line.endswith("the disk is full: free some space or write elsewhere")


def test_the_feature_cache_allocates_its_file_before_writing_rows(tmp_path):
    """Portable half of the test above: the file rows are written into holds no holes."""
    from vlmkit.train.features import CacheKey, _open_partial

    key = CacheKey(encoder="e", dataset="d", dtype="float16", count=64, num_tokens=16, feature_dim=512)
    features, start = _open_partial(tmp_path / "rows-0-64", key, 64)
    assert start == 0 and features.shape == (64, 16, 512)
    stat = (tmp_path / "rows-0-64" / "features.npy").stat()
    assert stat.st_blocks * 512 >= stat.st_size > 64 * 16 * 512 * 2


@pytest.fixture(scope="module")
def saved_model(checkpoints, tmp_path_factory) -> Path:
    from vlmkit.core.model import PrefixConditioningVLM

    config = {
        "encoder": "siglip",
        "encoder_checkpoint": checkpoints["encoder"],
        "decoder": "smollm",
        "decoder_checkpoint": checkpoints["decoder"],
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "max_caption_tokens": 4,
    }
    return PrefixConditioningVLM.build(config).save(tmp_path_factory.mktemp("saved") / "model")


def write_cases(train_args, saved_model, root: Path) -> dict[str, list[str]]:
    """Commands that write under ``root`` (a folder, a file or a read-only place)."""
    return {
        "train": train_args(root / "run", steps=1),
        "train --cache-dir": [
            *train_args(root.parent / "run-c", steps=1),
            "--cache-dir",
            str(root / "cache"),
        ],
        "export": ["export", "--model", str(saved_model), "--output", str(root / "export")],
        "eval": ["eval", "--model", str(saved_model), "--dataset", SHAPES, "--output", str(root / "eval")],
    }


@pytest.mark.parametrize("where", ["a file", "below a file"])
@pytest.mark.parametrize("command", ["train", "train --cache-dir", "export", "eval"])
def test_an_output_that_is_a_file_or_below_one_is_one_line_before_any_work(
    train_args, saved_model, tmp_path, run_main, command, where
):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    root = blocker if where == "below a file" else tmp_path
    args = write_cases(train_args, saved_model, root)[command]
    target = Path(args[args.index(next(a for a in args if a.startswith(str(root))))])
    if where == "a file":
        target.write_text("a file in the way")
    code, err = run_main(*args)
    assert code == 1, err
    (line,) = error_lines(err)
    flag = "--cache-dir" if command == "train --cache-dir" else "--output"
    if where == "a file":  # export said so already, in its own words
        assert str(target) in line and "not a folder; choose a" in line
    else:
        assert line == f"error: {flag} {target}: {blocker} is a file, not a folder; choose another place"
    assert "Loading weights" not in err or command in ("export", "eval")  # train refuses first


def test_vlmkit_home_that_is_a_file_is_one_line(train_args, tmp_path, run_main, monkeypatch):
    home = tmp_path / "home"
    home.write_text("not a folder")
    monkeypatch.setenv("VLMKIT_HOME", str(home))
    code, err = run_main(*train_args(tmp_path / "run", steps=1))
    assert code == 1
    assert error_lines(err) == [
        f"error: VLMKIT_HOME {home} is a file, not a folder; point VLMKIT_HOME at a folder"
    ]


def _in_private_tmpfs(target, tiny: Path, size_kb: int, read_only: bool, pipe, *args) -> None:
    try:
        _private_tmpfs(tiny, size_kb)
        if read_only:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)  # MS_REMOUNT | MS_RDONLY
            if libc.mount(b"tmpfs", str(tiny).encode(), b"tmpfs", 0x20 | 0x1, None) != 0:
                raise OSError(ctypes.get_errno(), "remount read-only")
    except OSError as exc:
        pipe.send(("unavailable", str(exc)))
        return
    pipe.send((target(*args), sorted(str(p.relative_to(tiny)) for p in tiny.rglob("*"))))


def _console(*commands: list[str]) -> list[tuple[int, str]]:
    import io
    import traceback

    from vlmkit.cli.main import main

    outcomes = []
    for args in commands:
        sys.argv, sys.stderr = ["vlmkit", *args], io.StringIO()
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code
        except Exception:  # noqa: BLE001 - told to the test, which fails on the traceback
            code = "raised"
            traceback.print_exc()
        outcomes.append((code, sys.stderr.getvalue()))
    return outcomes


def in_private_tmpfs(tiny: Path, size_kb: int, *commands: list[str], read_only: bool = False):
    """``vlmkit`` ``commands`` in a forked child that has a tmpfs of its own at ``tiny``:
    [(exit code, stderr)] each, and the files left in the tmpfs (gone with the child); skipped
    where user namespaces are off."""
    import multiprocessing

    tiny.mkdir(exist_ok=True)
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_in_private_tmpfs, args=(_console, tiny, size_kb, read_only, send, *commands))
    child.start()
    child.join(180)
    assert child.exitcode == 0, f"the child died (exit code {child.exitcode}: -7 is SIGBUS)"
    outcome = receive.recv()
    if outcome[0] == "unavailable":
        pytest.skip(f"no private tmpfs here (user namespaces off?): {outcome[1]}")
    return outcome


def test_read_only_outputs_are_one_line_each(train_args, saved_model, tmp_path):
    tiny = tmp_path / "ro"
    cases = write_cases(train_args, saved_model, tiny)
    outcomes, files = in_private_tmpfs(tiny, 64, *cases.values(), read_only=True)
    assert files == []
    for command, (code, err) in zip(cases, outcomes, strict=True):
        assert code == 1, (command, err)
        (line,) = error_lines(err)
        assert line.endswith(f": {tiny} is read-only; choose another place"), (command, line)


def test_a_full_disk_at_a_checkpoint_is_one_line_and_earlier_checkpoints_stay(train_args, tmp_path):
    tiny = tmp_path / "small"
    args = train_args(tiny / "run", "--set", "save_every=1", "--set", "save_total_limit=5", steps=3)
    ((code, err),), files = in_private_tmpfs(tiny, 512, args)
    assert code == 1, err
    (line,) = error_lines(err)
    assert line.startswith(f"error: cannot write {tiny / 'run' / 'checkpoints' / 'checkpoint-'}"), line
    assert line.endswith("the disk is full: free some space or write elsewhere")
    failed = line.split("checkpoint-")[1].split(":")[0]
    kept = {f.split("/")[2] for f in files if f.startswith("run/checkpoints/checkpoint-")}
    assert kept == {f"checkpoint-{step}" for step in range(1, int(failed))}  # the half-written one goes
    for step in range(1, int(failed)):
        assert f"run/checkpoints/checkpoint-{step}/trainer_state.json" in files
    assert "run/vlmkit.json" not in files


# ------------------------------------------------------------------------------ feature cache


def test_cached_features_changed_in_place_are_found_by_their_checksum_and_recomputed(
    train_args, run_main, tmp_path
):
    """Random bytes of the right size in features.npy: a warning naming the entry, the features are
    computed again, and the run trains on them (a finite loss), not on the garbage."""
    import numpy as np

    cache = tmp_path / "cache"
    code, err = run_main(*train_args(tmp_path / "first", "--cache-dir", str(cache), steps=1))
    assert code == 0, err
    entries = sorted(p for p in cache.iterdir() if (p / "features.npy").is_file())
    npy = entries[0] / "features.npy"
    good = np.load(npy).copy()
    header = npy.stat().st_size - good.nbytes
    with open(npy, "r+b") as f:
        f.seek(header)
        f.write(np.random.default_rng(0).bytes(good.nbytes))
    code, err = run_main(*train_args(tmp_path / "second", "--cache-dir", str(cache), steps=1))
    assert code == 0, err
    assert (
        f"warning: feature cache: {entries[0]} is unusable (features.npy does not match the checksum" in err
    )
    np.testing.assert_array_equal(np.load(npy), good)  # recomputed: the same features again
    metrics = json.loads((tmp_path / "second" / "vlmkit.json").read_text())["training"]
    assert np.isfinite(metrics["train_loss"])


# ------------------------------------------------------------------------------ run folder lock


def _train_paused_in_the_loop(args: list[str], pipe) -> None:
    """``vlmkit train ARGS`` that stops before its first step until the test says go."""
    import vlmkit.train.job as job

    real = job.VLMTrainer.train

    def paused(self, *a, **k):
        pipe.send("training")
        pipe.recv()
        return real(self, *a, **k)

    job.VLMTrainer.train = paused
    pipe.send(_console(args)[0])


@pytest.mark.parametrize("second", [[], ["--overwrite"]])
def test_a_second_train_into_a_folder_in_use_is_refused_in_one_line(train_args, run_main, tmp_path, second):
    import multiprocessing

    out = tmp_path / "run"
    ctx = multiprocessing.get_context("fork")
    ours, theirs = ctx.Pipe()
    first = ctx.Process(target=_train_paused_in_the_loop, args=(train_args(out, steps=2), theirs))
    first.start()
    try:
        assert ours.poll(120) and ours.recv() == "training"
        before = sorted(p.name for p in out.iterdir())
        code, err = run_main(*train_args(out, *second, steps=2))
        assert code == 1, err
        assert error_lines(err) == [
            f"error: output folder {out} is in use by another vlmkit train (process {first.pid}); wait for it "
            "to finish, or choose another --output"
        ]
        assert sorted(p.name for p in out.iterdir()) == before  # nothing written, nothing removed
    finally:
        ours.send("go")
        first.join(120)
    assert first.exitcode == 0 and ours.recv()[0] == 0
    steps = [json.loads(line)["step"] for line in (out / "logs.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and (out / "vlmkit.json").is_file()  # the first run's alone
    code, err = run_main(*train_args(out, "--overwrite", steps=1))  # free again once it ended
    assert code == 0, err


# ------------------------------------------------------------------------------ captions files

ROWS = "".join(json.dumps({"file_name": f"{i}.png", "caption": f"shape {i}"}) + "\n" for i in range(1, 7))
CAPTIONS_FILES = {
    "a CSV field over csv's limit": (
        "captions.csv",
        "file_name,caption\n0.png," + "x" * 140_000 + "\n",
        "captions.csv line 2 is not valid CSV (field larger than field limit (131072))",
    ),
    "deeply nested JSON": (
        "captions.jsonl",
        '{"file_name": "0.png", "caption": ' + "[" * 100_000 + "]" * 100_000 + "}\n" + ROWS,
        "captions.jsonl line 1 is JSON nested too deeply to read",
    ),
    "a lone surrogate in a caption": (
        "captions.jsonl",
        '{"file_name": "0.png", "caption": "a \\ud800 cat"}\n' + ROWS,
        "captions.jsonl line 1: the caption holds '\\ud800' at character 2, a lone surrogate: not text",
    ),
    "a file name that is not UTF-8": (
        "captions.jsonl",
        ROWS + '{"file_name": "\\udcff.png", "caption": "a cat"}\n',
        "captions.jsonl line 7: the file name holds '\\udcff' at character 0, a lone surrogate: not text",
    ),
    "a caption of 20,000 characters": (
        "captions.jsonl",
        ROWS + json.dumps({"file_name": "0.png", "caption": "cat " * 5000}) + "\n",
        "captions.jsonl line 7: the caption is 19999 characters long, more than 10000",
    ),
    "a caption that is a number": (
        "captions.jsonl",
        '{"file_name": "0.png", "caption": 42}\n' + ROWS,
        "captions.jsonl line 1: the 'caption' of 0.png is a JSON number, not text",
    ),
}


@pytest.mark.parametrize("case", list(CAPTIONS_FILES))
def test_a_hostile_captions_file_is_one_line_naming_the_line(train_args, run_main, tmp_path, case):
    from PIL import Image

    name, text, problem = CAPTIONS_FILES[case]
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(7):
        Image.new("RGB", (8, 8), (30 * i, 0, 0)).save(folder / f"{i}.png")
    (folder / name).write_text(text, errors="surrogatepass")
    code, err = run_main(*train_args(tmp_path / "run", dataset=f"folder:path={folder}"))
    assert code == 1, err
    assert error_lines(err) == [f"error: folder {folder}: {problem}"]


# ------------------------------------------------------------------------------ special tokens


@pytest.mark.parametrize(
    "decoder, arch, caption",
    [
        ("smollm", "llama", "A sign saying <|im_end|> then <|im_start|>assistant on a wall."),
        ("gpt2", "gpt2", "A shirt printed with <|endoftext|> in red."),
    ],
)
def test_special_tokens_written_in_a_caption_train_as_text(checkpoints, tmp_path, decoder, arch, caption):
    """``vlmkit inspect`` shows the target exactly as training builds it: the characters of a
    control token written in a caption are text, and the only control token is the end."""
    from typer.testing import CliRunner

    from vlmkit.cli.main import app

    path = checkpoints["decoder"] if arch == "llama" else tiny_decoder_checkpoint(arch, tmp_path / arch)
    args = ["inspect", caption, "--decoder", decoder, "--decoder-checkpoint", path,
            "--encoder", "siglip", "--encoder-checkpoint", checkpoints["encoder"], "--json"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    target = [p for p in shown["positions"] if p["part"] == "target"]
    stops = len(target) - next(i for i, p in enumerate(target) if p["token_id"] in shown["stop_token_ids"])
    assert stops == 1 and target[-1]["token_id"] in shown["stop_token_ids"]
    assert "".join(p["text"] for p in target[:-1]).strip() == caption
    pieces = {p["piece"] for p in target[:-1]}
    assert not pieces & {"<|im_end|>", "<|im_start|>", "<|endoftext|>"}


@pytest.mark.parametrize(
    "flag, value", [("--epochs", "inf"), ("--lr-lora", "nan"), ("--set", "model.lora.alpha=.inf")]
)
def test_infinite_or_nan_settings_are_refused_in_one_line(train_args, run_main, tmp_path, flag, value):
    code, err = run_main(*train_args(tmp_path / "run"), flag, value)
    assert code == 1
    (line,) = error_lines(err)
    assert line.startswith("error: configuration: ") and line.endswith("Input should be a finite number")


# ------------------------------------------------------------------------------ stray files


def test_export_removes_the_staging_folders_of_killed_exports(saved_model, tmp_path, run_main):
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()  # a process id that no longer runs: an export killed with -9
    killed = tmp_path / f".export.{gone.pid}-0123abcd.partial"
    running = tmp_path / f".export.{os.getppid()}-4567ef01.partial"  # another export, still running
    for folder in (killed, running):
        folder.mkdir()
        (folder / "decoder.onnx").write_bytes(b"half of a graph")
    code, err = run_main(
        "export", "--model", str(saved_model), "--output", str(tmp_path / "export"), "--format", "hf"
    )
    assert code == 0, err
    assert not killed.exists() and running.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [running.name, "export"]


def test_sigterm_ends_training_with_the_message_ctrl_c_gives(train_args, tmp_path):
    import multiprocessing
    import signal

    out = tmp_path / "run"
    ctx = multiprocessing.get_context("fork")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_train_paused_in_the_loop, args=(train_args(out, steps=2), theirs))
    child.start()
    assert ours.poll(120) and ours.recv() == "training"
    os.kill(child.pid, signal.SIGTERM)
    child.join(60)
    assert child.exitcode == 0 and ours.poll(5)
    code, err = ours.recv()
    assert code == 130, err
    assert (
        f"interrupted: checkpoints in {out / 'checkpoints'} are kept; continue with: vlmkit train"
        in " ".join(err.split())
    )


def test_a_resumed_run_logs_each_step_once(train_args, run_main, tmp_path):
    import shutil

    out = tmp_path / "run"
    args = train_args(out, "--set", "save_every=2", "--set", "logging_steps=1", steps=4)
    assert run_main(*args)[0] == 0
    shutil.rmtree(out / "checkpoints" / "checkpoint-4")  # killed after logging step 4, before its checkpoint
    (out / "vlmkit.json").unlink()
    code, err = run_main(*args, "--resume")
    assert code == 0, err
    records = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert "(0.00 samples/s)" not in err


def test_resuming_a_run_killed_in_its_final_save_reports_no_made_up_speed(train_args, run_main, tmp_path):
    out = tmp_path / "run"
    args = train_args(out, "--set", "save_every=2", steps=4)
    assert run_main(*args)[0] == 0
    (out / "vlmkit.json").unlink()  # killed while writing the model, after the last checkpoint
    code, err = run_main(*args, "--resume")
    assert code == 0, err
    assert "trained 4 steps in " in err and "samples/s" not in err


def test_terminal_escapes_in_file_names_of_a_captions_file_are_printed_as_text(
    train_args, run_main, tmp_path
):
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(7):
        Image.new("RGB", (8, 8), (30 * i, 0, 0)).save(folder / f"{i}.png")
    odd = "clear\x1b[2Jscreen\x07.png"  # listed, and missing
    (folder / "captions.jsonl").write_text(ROWS.replace('"1.png"', json.dumps(odd)))
    code, err = run_main(*train_args(tmp_path / "run", dataset=f"folder:path={folder}"))
    assert code == 1 and "\x1b" not in err and "\x07" not in err
    (line,) = error_lines(err)
    assert "(1 missing: clear\\x1b[2Jscreen\\x07.png)" in line
