"""Every benchmark in ``benchmarks/`` still produces its figures: each runs its ``--smoke`` (tiny
models, a few seconds) in a process of its own, and must exit 0 with the rows named here in its
JSON lines, each with finite numbers and the machine it ran on. A moved import or a renamed option
is then a red test, not a broken headline.

The Python benchmarks run as ``python benchmarks/X.py --smoke`` would, but in a process forked
from this one after it has imported torch, transformers and peft once: a fresh interpreter spends
8-12 s of CPU importing them on our 2-core machines, which would be most of each smoke. The forked
process runs the script from its first line (``runpy``, as ``__main__``), so its own imports are
all checked. ``gpu_check.sh`` runs in bash, and its Python in a fresh interpreter.

Every smoke pins fp32 (``--precision fp32`` where a script has the option; the others run fp32
unless they are about precision) and one torch thread.
"""

from __future__ import annotations

import json
import math
import os
import runpy
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import harness  # noqa: E402

#: what a smoke may take before it counts as hung (a busy CI machine, not the goal of seconds)
TIMEOUT_S = 240
FP32 = ["--precision", "fp32"]
GPU_ROWS = [
    "bf16 matmul peak",
    "vlmkit SmolLM2-135M | [B, 196, 32] | fp32 | batch 2",
    "vlmkit SmolLM2-135M | [B, 16, 32] | fp32 + ckpt | batch 2",
    "vlmkit Qwen2.5-0.5B | [B, 16, 32] | fp32 | batch 2",
    "1 upstream OLD: VisionEncoderDecoder SigLIP+GPT-2, all trained | pixels 224 px | tf32 | batch 2",
    "2 upstream NEW as built: SigLIP each step, 196-token prefix, full logits | pixels 224 px | tf32 | batch 2",
]
#: script -> (its arguments after --smoke, rows its JSON lines must hold)
SMOKES: dict[str, tuple[list[str], list[str]]] = {
    "train_throughput.py": (
        [*FP32, "--baseline-precision", "fp32"],
        [
            "settings",
            "matmul peak float32",
            "ved:fp32",
            "prefix196:fp32",
            "vlmkit:fp32",
            "ratio 3/1 (vlmkit fp32 vs ved fp32)",
            "ratio 3/2 (vlmkit fp32 vs prefix196 fp32)",
            "ratio 2/1 (prefix196 vs ved, both fp32)",
            "profile",
            "variant: vlmkit's choice",
            "variant: LoRA dropout 0.05",
            "trainer",
        ],
    ),
    "gpu_throughput.py": ([], GPU_ROWS),
    "gpu_check.sh": ([], GPU_ROWS),
    "export_speed.py": (
        [],
        [
            "export",
            "pytorch eager | batch 1",
            "onnx fp32 | batch 2",
            "onnx int8 | batch 2",
            "agreement",
            "file sizes",
        ],
    ),
    "feature_cache.py": (
        [],
        [
            "timm | from the cache",
            "timm | encoder every step",
            "siglip | from the cache",
            "siglip | speed-up",
        ],
    ),
    "length_grouping.py": (FP32, ["shuffled", "grouped", "grouped vs shuffled"]),
    "memory_table.py": ([], ["SmolLM2-135M", "Qwen2.5-0.5B", "Qwen2.5-1.5B"]),
    "quality.py": ([], ["default", "xattn"]),
    "colour_probe.py": ([], ["last", "stage2"]),
    "scale.py": (
        [],
        ["cache | 196 tokens", "cache | 16 tokens", "loader | features-0", "startup | 8-options"],
    ),
    "startup.py": ([], ["python -c pass", "vlmkit --help", "vlmkit --version", "vlmkit plugins list"]),
    "unfreeze_roundtrip.py": ([], ["in memory", "saved and loaded"]),
    "web_browser.py": ([], ["web"]),
    "web_quantization.py": (
        [],
        ["fp32", "int8", "int8-acc4", "int4", "int4 + int8 embeddings", "embedding table"],
    ),
}
#: files of benchmarks/ that are not benchmarks
NOT_BENCHMARKS = {"harness.py", "cross_attention.py"}  # the shared harness; a module of quality.py


@pytest.fixture(scope="module")
def warm_imports():
    """What the benchmarks import, imported once here, before the forks."""
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers
    from transformers import SiglipImageProcessor  # noqa: F401 - torchvision and the image utilities

    import vlmkit.export  # noqa: F401
    import vlmkit.train.job  # noqa: F401 - Trainer, accelerate

    transformers.utils.logging.disable_progress_bar()


def run_forked(argv: list[str], log: Path, env: dict[str, str]) -> int:
    """``python *argv`` in a process forked from this one; its output goes to ``log``; the exit
    status. A run past ``TIMEOUT_S`` is killed and fails the test."""
    pid = os.fork()
    if pid == 0:  # the child: runs the script and never returns into pytest
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = sys.stderr = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
            os.environ.update(env)
            sys.argv = list(argv)
            sys.path.insert(0, str(Path(argv[0]).parent))  # as python puts the script's folder first
            runpy.run_path(argv[0], run_name="__main__")
            code = 0
        except SystemExit as exc:
            if isinstance(exc.code, str):  # raise SystemExit("message"): python prints it, exit 1
                print(exc.code, file=sys.stderr)
            code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        except BaseException:  # noqa: BLE001 - the child reports everything and exits
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            os._exit(code)
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail(f"{argv[0]} --smoke ran past {TIMEOUT_S} s; its output:\n{log.read_text()[-3000:]}")


def check_rows(script: str, jsonl: Path, expected: list[str], output: str) -> None:
    assert jsonl.is_file(), f"{script} wrote no JSON lines; output:\n{output[-3000:]}"
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    names = [r["row"] for r in rows]
    missing = [name for name in expected if name not in names]
    assert not missing, f"{script}: rows {missing} missing from {names}"
    for r in rows:
        assert r["smoke"] is True and r["machine"]["cpu"], r
        numbers = list(harness._numbers({k: v for k, v in r.items() if k != "machine"}))
        assert numbers and all(math.isfinite(v) for _, v in numbers), (script, r["row"], numbers)


@pytest.mark.parametrize("script", sorted(SMOKES))
def test_the_benchmark_produces_its_figures_in_its_smoke_run(script, tmp_path, warm_imports):
    args, expected = SMOKES[script]
    jsonl, log = tmp_path / "rows.jsonl", tmp_path / "output.txt"
    env = {
        "VLMKIT_HOME": str(tmp_path / "home"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    started = time.perf_counter()
    if script.endswith(".sh"):
        done = subprocess.run(
            ["bash", str(BENCHMARKS / script), "--smoke", "--json", str(jsonl)],
            env={**os.environ, **env, "PYTHON": sys.executable},
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        rc, output = done.returncode, done.stdout + done.stderr
    else:
        one_thread = [] if script == "startup.py" else ["--threads", "1"]  # startup times fresh processes
        argv = [str(BENCHMARKS / script), "--smoke", "--json", str(jsonl), *one_thread, *args]
        rc = run_forked(argv, log, env)
        output = log.read_text()
    seconds = time.perf_counter() - started
    assert rc == 0, f"{script} --smoke exited {rc} after {seconds:.0f} s; its output:\n{output[-4000:]}"
    assert "every figure finite" in output  # the script's own check ran
    check_rows(script, jsonl, expected, output)


def test_every_benchmark_has_a_smoke_run_here():
    scripts = {p.name for p in BENCHMARKS.iterdir() if p.suffix in (".py", ".sh")}
    assert scripts - NOT_BENCHMARKS == set(SMOKES)


def test_a_smoke_run_fails_without_every_row_or_with_a_figure_not_finite(capsys):
    report = harness.Report("example", smoke=True)
    report.row("cache", samples_per_s=12.5)
    report.row("encoder", samples_per_s=float("nan"))
    report.row("notes", text="no numbers here")
    assert report.finish(["cache", "encoder", "pixels"]) == 1
    error = capsys.readouterr().err
    assert "'pixels' is missing" in error
    assert "'encoder': samples_per_s = nan" in error
    assert "'notes' has no figures" in error
    complete = harness.Report("example", smoke=True)
    complete.row("cache", samples_per_s=12.5, nested={"step_s": [0.5, 0.6]})
    assert complete.finish(["cache"]) == 0
    assert harness.Report("example").finish(["never measured"]) == 0  # only --smoke checks


def test_every_row_records_the_machine_as_a_json_line(tmp_path):
    import torch

    report = harness.Report("example", json_path=tmp_path / "rows.jsonl")
    report.row("a", seconds=1.5)
    report.row("b", seconds=2.5)
    report.finish()
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rows] == ["a", "b"]
    machine = rows[0]["machine"]
    assert machine["cpu"] and machine["cores"] >= 1 and isinstance(machine["bf16_flags"], list)
    assert machine["torch"] == torch.__version__ and machine["threads"] == torch.get_num_threads()
