"""``vlmkit.core.placement``: ``--device`` and ``--precision``, and the measured choice on a CPU."""

from __future__ import annotations

import pytest

from vlmkit.core import placement as device
from vlmkit.core.errors import ConfigError
from vlmkit.core.placement import cpu_matmul_probe, resolve

REAL_PROBE = cpu_matmul_probe  # conftest replaces the module's probe with fixed figures


@pytest.fixture
def probe(monkeypatch, tmp_path):
    """``probe(fp32, bf16)``: the real probe and its cache (in a temporary folder), measuring these
    GFLOP/s; returns the list of measurements made."""
    calls = []

    def set_figures(fp32: float, bf16: float):
        def measure(*args, **kwargs):
            calls.append((fp32, bf16))
            return {"fp32_gflops": fp32, "bf16_gflops": bf16}

        monkeypatch.setattr(device, "cpu_matmul_probe", REAL_PROBE)
        monkeypatch.setattr(device, "measure_cpu_matmul", measure)
        return calls

    return set_figures


def test_auto_on_a_cpu_whose_bf16_is_slower_picks_fp32(probe, tmp_path):
    probe(fp32=149.0, bf16=58.5)  # Intel Xeon with avx512_bf16, no AMX (issue 13)
    placement = resolve("cpu", "auto", cache_dir=tmp_path)
    assert (placement.device, placement.precision, placement.dtype) == ("cpu", "fp32", "float32")
    assert "bf16 58 vs fp32 149 GFLOP/s" in placement.reason


def test_auto_on_a_cpu_whose_bf16_is_faster_picks_bf16(probe, tmp_path):
    probe(fp32=100.0, bf16=210.0)  # a Zen 4 core
    placement = resolve("auto", "auto", cache_dir=tmp_path)
    assert (placement.device, placement.precision, placement.dtype) == ("cpu", "bf16", "bfloat16")
    assert "bf16 210 vs fp32 100 GFLOP/s" in placement.describe()


def test_a_tie_goes_to_fp32(probe, tmp_path):
    probe(fp32=100.0, bf16=110.0)  # bf16 costs accuracy: it must be clearly faster
    assert resolve("cpu", "auto", cache_dir=tmp_path).precision == "fp32"


def test_the_probe_runs_once_per_machine_and_is_cached(probe, tmp_path):
    calls = probe(fp32=100.0, bf16=210.0)
    first = resolve("cpu", "auto", cache_dir=tmp_path)
    again = resolve("cpu", "auto", cache_dir=tmp_path)
    assert len(calls) == 1 and (tmp_path / device.PROBE_FILE).is_file()
    assert first.precision == again.precision == "bf16"
    assert "measured earlier" in again.reason


def test_the_real_probe_measures_both_precisions():
    figures = device.measure_cpu_matmul(size=64, repeats=1)
    assert set(figures) == {"fp32_gflops", "bf16_gflops"} and all(v > 0 for v in figures.values())


def test_an_explicit_precision_is_kept_and_gpu_only_ones_are_refused_on_a_cpu():
    assert resolve("cpu", "bf16").precision == "bf16"
    assert resolve("cpu", "fp32").dtype == "float32"
    for precision in ("fp16", "tf32"):
        with pytest.raises(ConfigError, match=f"precision {precision} needs a GPU"):
            resolve("cpu", precision)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("gpu", "unknown device 'gpu'; use auto, cpu, cuda, cuda:N or mps"),
        ("cuda", "no CUDA GPU is visible here"),
        ("cuda:1", "no CUDA GPU is visible here"),
        ("mps", "Apple MPS is not available here"),
    ],
)
def test_devices_that_do_not_exist_here_are_one_line_config_errors(name, message):
    with pytest.raises(ConfigError, match=message) as info:
        resolve(name, "fp32")
    assert "\n" not in str(info.value)


def test_unknown_precision_is_refused():
    with pytest.raises(ConfigError, match="unknown precision 'half'"):
        resolve("cpu", "half")
