"""How long the light CLI commands take to start, next to a bare interpreter.

    python benchmarks/startup.py [--runs 10]

Each command runs in a fresh process, once to warm the file cache and then ``--runs`` times; the
table shows the median and the fastest run, and how many times slower than ``python -c pass`` in
the same session. The goal is under 0.3 s each. After the table come the ten imports with the
largest cumulative time in ``python -X importtime -m vlmkit.cli.main plugins list``.

``--smoke``: one timed run each (a second or two in all): checks the script and that the commands
still exit 0; its figures are real but noisy. ``--json PATH``: one JSON line per command, then
one per slow import.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import harness

GOAL_S = 0.3


def vlmkit_command() -> list[str]:
    """The installed console script (what users run), else ``python -m vlmkit.cli.main``."""
    script = Path(sysconfig.get_path("scripts")) / "vlmkit"
    if script.exists():
        return [str(script)]
    found = shutil.which("vlmkit")
    return [found] if found else [sys.executable, "-m", "vlmkit.cli.main"]


def wall_times(argv: list[str], runs: int, env: dict[str, str]) -> list[float]:
    """Seconds of ``runs`` runs of ``argv`` after a warm-up; stops at the first that fails."""
    times = []
    for i in range(runs + 1):
        start = time.perf_counter()
        done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode:
            raise SystemExit(
                f"{' '.join(argv)} failed (exit {done.returncode}): {done.stderr.strip()[-500:]}"
            )
        if i:  # the first warms the file cache
            times.append(time.perf_counter() - start)
    return times


def top_imports(env: dict[str, str], count: int = 10) -> list[tuple[int, int, str]]:
    """(cumulative us, self us, module) of the slowest imports of ``vlmkit plugins list``."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "vlmkit.cli.main", "plugins", "list"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    rows = []
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cumulative_us, name = line.removeprefix("import time:").split("|")
        rows.append((int(cumulative_us), int(self_us), name.rstrip()))
    return sorted(rows, reverse=True)[:count]


def main(argv=None) -> int:
    parser = harness.parser(__doc__, threads=False)
    parser.add_argument("--runs", type=int, default=10, help="timed runs per command (after one warm-up)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.runs = 1
    out = harness.start(args, "startup", torch=False)  # it times fresh processes; torch is theirs to load

    env = dict(os.environ, COLUMNS="100")
    vlmkit = vlmkit_command()
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "vlmkit --help": [*vlmkit, "--help"],
        "vlmkit --version": [*vlmkit, "--version"],
        "vlmkit plugins list": [*vlmkit, "plugins", "list"],
    }
    print(f"python {sys.version.split()[0]} at {sys.executable}; vlmkit: {' '.join(vlmkit)}")
    print(harness.describe_machine())
    print(f"{args.runs} runs each after 1 warm-up; goal: under {GOAL_S:.1f} s\n")
    print(f"{'command':<22}{'median s':>10}{'min s':>8}{'x python':>10}{'+ms':>7}  goal")
    baseline = None
    for label, argv in commands.items():
        times = wall_times(argv, args.runs, env)
        median, fastest = statistics.median(times), min(times)
        out.row(label, median_s=median, min_s=fastest, runs=len(times), under_goal=median < GOAL_S)
        if baseline is None:
            baseline = median
            print(f"{label:<22}{median:>10.3f}{fastest:>8.3f}{1:>10.1f}{0:>7.0f}")
            continue
        verdict = "ok" if median < GOAL_S else "OVER"
        print(
            f"{label:<22}{median:>10.3f}{fastest:>8.3f}{median / baseline:>10.1f}"
            f"{(median - baseline) * 1000:>7.0f}  {verdict}"
        )

    print("\nslowest imports of 'vlmkit plugins list' (python -X importtime), by cumulative time:")
    print(f"{'cumulative ms':>14}{'self ms':>9}  module")
    imports = top_imports(env)
    for cumulative_us, self_us, name in imports:
        print(f"{cumulative_us / 1000:>14.1f}{self_us / 1000:>9.1f}  {name}")
        out.row(f"import {name.strip()}", cumulative_ms=cumulative_us / 1000, self_ms=self_us / 1000)
    # the slowest import is a row a smoke run must have: none means importtime's format changed
    slowest = f"import {imports[0][2].strip()}" if imports else "import (none measured)"
    return out.finish([*commands, slowest])


if __name__ == "__main__":
    sys.exit(main())
