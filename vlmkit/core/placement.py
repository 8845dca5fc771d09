"""Where a model runs and in which precision: ``--device`` and ``--precision`` of every command.

``device``: ``auto`` (CUDA, else Apple MPS, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
``precision``: ``auto``, ``fp32``, ``tf32`` (fp32 weights, TF32 matmuls on Ampere+ GPUs),
``bf16`` or ``fp16`` (autocast in training with fp32 LoRA/projection; the frozen base weights in
that dtype).

``auto`` follows the hardware: on CUDA bf16 where the card has it, else fp16 (with loss scaling in
training; fp32 for a decoder whose plugin declares ``fp16_safe = False``); on MPS fp32; on a CPU a measured choice. bf16 matmuls are ~2x faster than fp32 on a
Xeon with AMX or a Zen 4 core but ~2.5x slower on a Xeon without AMX (and ~100x slower on CPUs
without any bf16 instructions), so a short probe decides there: one thread, fp32 and bf16 matmuls
timed in alternating rounds, the best of several rounds each (a busy moment slows a sample, never
speeds one up, so one slow sample cannot decide), bf16 chosen only when it wins by
``CPU_BF16_MARGIN``. The decision is stored under ``VLMKIT_HOME`` with the CPU, the torch version
and the thread count it was measured for. ``VLMKIT_CPU_PRECISION=fp32`` (or ``bf16``) decides
``auto`` on a CPU without probing: for machines of mixed CPUs that must train alike, and for tests.

Importing this module does not import torch.
"""

from __future__ import annotations

import os
import platform
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmkit.core.errors import ConfigError

DEVICES = "auto, cpu, cuda, cuda:N or mps"
PRECISIONS = ("auto", "fp32", "tf32", "bf16", "fp16")
DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:\d+)?)$"
#: bf16 must beat fp32 by this factor on a CPU to be chosen: it costs accuracy, so a tie goes to fp32
CPU_BF16_MARGIN = 1.2
PROBE_FILE = "cpu-matmul-probe.json"
#: decides ``auto`` on a CPU without the probe (fp32 or bf16)
CPU_PRECISION_ENV = "VLMKIT_CPU_PRECISION"
#: part of the stored decision's key: a better probe measures again (1: a few ms at full threads)
PROBE_VERSION = 2


@dataclass(frozen=True)
class Placement:
    """A resolved device and precision, and the one line that says why."""

    device: str  # "cpu", "cuda", "cuda:1", "mps"
    precision: str  # fp32 | tf32 | bf16 | fp16
    reason: str

    @property
    def dtype(self) -> str:
        """The torch dtype name of the frozen base weights: bfloat16, float16 or float32."""
        return {"bf16": "bfloat16", "fp16": "float16"}.get(self.precision, "float32")

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]

    def describe(self) -> str:
        return f"device {self.device}, precision {self.precision}: {self.reason}"


def check_device_name(device: str) -> str:
    """``device`` if it is one of the accepted spellings; ``ConfigError`` otherwise (no torch)."""
    if not re.match(DEVICE_PATTERN, str(device)):
        raise ConfigError(f"unknown device {device!r}; use {DEVICES}")
    return device


def resolve_device(device: str = "auto") -> str:
    """The device ``device`` names, checked to exist here; ``auto``: CUDA, else MPS, else CPU."""
    import torch

    check_device_name(device)
    has_mps = torch.backends.mps.is_available()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r}: no CUDA GPU is visible here; use --device cpu or auto")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                f"numbered from 0"
            )
    if device == "mps" and not has_mps:
        raise ConfigError("device 'mps': Apple MPS is not available here; use --device cpu or auto")
    return device


def resolve(
    device: str = "auto",
    precision: str = "auto",
    *,
    cache_dir: Path | None = None,
    no_fp16: str | None = None,
) -> Placement:
    """Device and precision for a run, ``auto`` resolved as the module docstring says.

    ``no_fp16``: the name of a decoder plugin that declares it overflows in fp16
    (``fp16_safe = False``): ``auto`` never picks fp16 for it and ``fp16`` is refused."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
    device = resolve_device(device)
    kind = device.split(":")[0]
    if precision == "fp16" and no_fp16 and kind != "cpu":
        raise ConfigError(
            f"precision fp16: decoder {no_fp16!r} overflows in fp16 (its plugin declares fp16_safe = False); "
            "use --precision bf16 where the GPU has it, or fp32"
        )
    if kind == "cuda":
        return _cuda(device, precision, no_fp16)
    if precision in ("tf32", "fp16") and kind == "cpu":
        raise ConfigError(f"precision {precision} needs a GPU; on a CPU use bf16, fp32 or auto")
    if precision == "tf32":
        raise ConfigError("precision tf32 is a CUDA (Ampere or newer) mode; on MPS use fp32, fp16 or bf16")
    if precision != "auto":
        return Placement(device, precision, "as asked")
    if kind == "mps":
        return Placement(device, "fp32", "auto on MPS: fp32 (mixed precision on MPS is not yet verified)")
    return _cpu_auto(cache_dir)


def _cuda(device: str, precision: str, no_fp16: str | None = None) -> Placement:
    import torch

    name = torch.cuda.get_device_name(device)
    major, minor = torch.cuda.get_device_capability(device)
    has_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    if precision == "bf16" and not has_bf16:
        raise ConfigError(
            f"precision bf16: {name} (compute capability {major}.{minor}) has no bf16; use fp16 or auto"
        )
    if precision == "tf32" and major < 8:
        raise ConfigError(f"precision tf32 needs an Ampere or newer GPU; {name} is {major}.{minor}: use fp32")
    if precision != "auto":
        return Placement(device, precision, f"as asked on {name}")
    if has_bf16:
        return Placement(device, "bf16", f"auto on {name}: bf16 is supported")
    if no_fp16:
        why = f"auto on {name} ({major}.{minor}, no bf16): fp32, as decoder {no_fp16!r} overflows in fp16"
        return Placement(device, "fp32", why)
    return Placement(device, "fp16", f"auto on {name} ({major}.{minor}, no bf16): fp16 with loss scaling")


def _cpu_auto(cache_dir: Path | None) -> Placement:
    forced = os.environ.get(CPU_PRECISION_ENV, "").strip().lower()
    if forced:
        if forced not in ("fp32", "bf16"):
            raise ConfigError(f"{CPU_PRECISION_ENV}={forced!r}: use fp32 or bf16 (or unset it to measure)")
        return Placement("cpu", forced, f"auto on CPU: {forced} as {CPU_PRECISION_ENV} says")
    probe = cpu_matmul_probe(cache_dir)
    fp32, bf16 = probe["fp32_gflops"], probe["bf16_gflops"]
    choice = "bf16" if bf16 >= CPU_BF16_MARGIN * fp32 else "fp32"
    why = (
        f"auto on CPU {probe['cpu']!r}: matmul bf16 {bf16:.0f} vs fp32 {fp32:.0f} GFLOP/s per thread "
        f"({'measured' if not probe.get('cached') else 'measured earlier'}; bf16 needs "
        f"{CPU_BF16_MARGIN}x)"
    )
    return Placement("cpu", choice, why)


# ---------------------------------------------------------------------------- the CPU probe


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_matmul_probe(cache_dir: Path | None = None) -> dict[str, Any]:
    """``{"cpu", "fp32_gflops", "bf16_gflops", "cached"}`` for this machine, torch and thread count:
    read from ``cache_dir/cpu-matmul-probe.json`` or measured (``measure_cpu_matmul``) and stored."""
    import json

    import torch

    from vlmkit.core.paths import cache_dir as default_cache_dir
    from vlmkit.core.paths import write_json

    key = f"{cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads | probe {PROBE_VERSION}"
    file = Path(cache_dir or default_cache_dir()) / PROBE_FILE
    try:
        known = json.loads(file.read_text()) if file.is_file() else {}
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    if isinstance(known.get(key), dict) and {"fp32_gflops", "bf16_gflops"} <= set(known[key]):
        return {**known[key], "cpu": cpu_name(), "cached": True}
    measured = measure_cpu_matmul()
    known[key] = measured
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        write_json(file, known)
    except OSError:  # a read-only cache only costs the next run a few ms
        pass
    return {**measured, "cpu": cpu_name(), "cached": False}


def measure_cpu_matmul(
    size: int = 256,
    rounds: int = 7,
    budget_s: float = 0.2,
    *,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """GFLOP/s of a ``size``-square matmul in fp32 and bf16 on one CPU thread.

    Both are timed in alternating rounds (each a few matmuls, ~1 ms together), so a busy moment of
    the machine falls on both alike, and each dtype's figure is its best round: load only ever
    slows a sample down, so one slow sample cannot decide. A dtype with no fast kernel (bf16
    without AVX512-BF16 or AMX runs ~100x slower) stops being timed once it has spent
    ``budget_s``: its speed is plain by then. One thread: a second thread descheduled by another
    process stalls a parallel matmul, and the per-core ratio of the two dtypes is what decides.
    """
    import torch

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    operands = {n: (torch.randn(size, size).to(d), torch.randn(size, size).to(d)) for n, d in dtypes.items()}
    best = dict.fromkeys(dtypes, float("inf"))
    spent = dict.fromkeys(dtypes, 0.0)
    repeats = dict.fromkeys(dtypes, 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, (a, b) in operands.items():  # warm-up, and how many matmuls make a ~1 ms sample
            start = clock()
            torch.mm(a, b)
            took = max(clock() - start, 1e-9)
            repeats[name] = max(1, min(16, int(1e-3 / took)))
            spent[name] += took
        for _ in range(rounds):
            for name, (a, b) in operands.items():
                if spent[name] > budget_s and best[name] < float("inf"):
                    continue  # plainly slow: more samples would only cost time
                start = clock()
                for _ in range(repeats[name]):
                    torch.mm(a, b)
                took = max(clock() - start, 1e-9)
                spent[name] += took
                best[name] = min(best[name], took / repeats[name])
    finally:
        torch.set_num_threads(threads)
    return {f"{name}_gflops": float(f"{2 * size**3 / best[name] / 1e9:.4g}") for name in dtypes}


def place(load, path, *, device: str | None = None, dtype: Any = None, **kwargs) -> Any:
    """``load(path, dtype=..., **kwargs)`` placed on ``device`` (default cpu). ``dtype``: a torch
    dtype, its name or a precision name; ``tf32`` loads fp32 and allows TF32 matmuls."""
    import torch

    name = None if dtype is None else str(torch_dtype(dtype)).removeprefix("torch.")
    model = load(path, dtype=name, **kwargs)
    if device is not None:
        model.to(resolve_device(device))
    if str(dtype) == "tf32":  # fp32 weights, TF32 matmuls on Ampere+ GPUs (no effect elsewhere)
        torch.backends.cuda.matmul.allow_tf32 = True
    return model


def torch_dtype(name: Any) -> Any:
    """``torch.float32`` etc. for a torch dtype, ``float32``/``bfloat16``/``float16`` (or
    ``torch.float16``), a precision name, or ``None`` (float32): vlmkit's one dtype converter."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    names = {"fp32": "float32", "tf32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    text = str(name or "float32").removeprefix("torch.")
    value = getattr(torch, names.get(text, text), None)
    if not isinstance(value, torch.dtype):
        raise ConfigError(f"unknown dtype {name!r}; use float32, bfloat16, float16 (or fp32, bf16, fp16)")
    return value
