"""``vlmkit.core.placement``: ``--device`` and ``--precision``, and the measured choice on a CPU."""

from __future__ import annotations

import pytest

from vlmkit.core import placement as device
from vlmkit.core.errors import ConfigError
from vlmkit.core.placement import resolve


@pytest.fixture(autouse=True)
def measure_here(monkeypatch):
    """conftest pins ``auto`` on a CPU to fp32 for the suite; these tests decide it themselves."""
    monkeypatch.delenv(device.CPU_PRECISION_ENV, raising=False)


@pytest.fixture
def probe(monkeypatch, tmp_path):
    """``probe(fp32, bf16)``: the real probe and its cache (in a temporary folder), measuring these
    GFLOP/s; returns the list of measurements made."""
    calls = []

    def set_figures(fp32: float, bf16: float):
        def measure(*args, **kwargs):
            calls.append((fp32, bf16))
            return {"fp32_gflops": fp32, "bf16_gflops": bf16}

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
    figures = device.measure_cpu_matmul(size=64, rounds=2)
    assert set(figures) == {"fp32_gflops", "bf16_gflops"} and all(v > 0 for v in figures.values())


def scripted_clock(durations: dict[str, list[float]]):
    """A clock for ``measure_cpu_matmul`` whose samples take the given seconds: each timed sample is
    two reads (start, end); the warm-up and the rounds alternate fp32, bf16 as the probe does."""
    assert len(durations["fp32"]) == len(durations["bf16"])
    order = ["fp32", "bf16"] * len(durations["fp32"])
    taken = iter(durations[name][i // 2] for i, name in enumerate(order))
    state = {"now": 0.0, "reads": 0}

    def clock() -> float:
        state["reads"] += 1
        if state["reads"] % 2 == 0:  # the end of a sample
            state["now"] += next(taken)
        return state["now"]

    return clock


@pytest.mark.parametrize("slow", ["fp32", "bf16"])
def test_one_slow_sample_cannot_flip_the_choice(slow):
    """A busy moment (another process on the core) makes one sample 50x slower: the best of the
    rounds still decides, as under load where the old probe once read fp32 at 4 GFLOP/s."""
    ms = 1e-3
    # warm-up, then 4 rounds; bf16 twice as fast as fp32 (an AMX Xeon), and the reverse
    for fp32, bf16, expected in ((2 * ms, 1 * ms, "bf16"), (1 * ms, 3 * ms, "fp32")):
        durations = {"fp32": [fp32] * 5, "bf16": [bf16] * 5}
        durations[slow][2] *= 50
        figures = device.measure_cpu_matmul(size=16, rounds=4, clock=scripted_clock(durations))
        flop = 2 * 16**3
        assert figures == {
            "fp32_gflops": pytest.approx(flop / fp32 / 1e9, rel=1e-3),
            "bf16_gflops": pytest.approx(flop / bf16 / 1e9, rel=1e-3),
        }
        choice = (
            "bf16" if figures["bf16_gflops"] >= device.CPU_BF16_MARGIN * figures["fp32_gflops"] else "fp32"
        )
        assert choice == expected


def test_a_stored_decision_is_keyed_by_cpu_torch_threads_and_probe_version(probe, tmp_path):
    import json

    probe(fp32=100.0, bf16=210.0)
    resolve("cpu", "auto", cache_dir=tmp_path)
    (key,) = json.loads((tmp_path / device.PROBE_FILE).read_text())
    assert device.cpu_name() in key and "torch " in key and " threads" in key
    assert f"probe {device.PROBE_VERSION}" in key


def test_the_environment_decides_auto_on_a_cpu_without_probing(probe, monkeypatch, tmp_path):
    calls = probe(fp32=100.0, bf16=210.0)
    monkeypatch.setenv(device.CPU_PRECISION_ENV, "fp32")
    placement = resolve("cpu", "auto", cache_dir=tmp_path)
    assert placement.precision == "fp32" and device.CPU_PRECISION_ENV in placement.reason
    assert resolve("cpu", "bf16").precision == "bf16"  # an explicit precision still wins
    assert calls == []
    monkeypatch.setenv(device.CPU_PRECISION_ENV, "fp8")
    with pytest.raises(ConfigError, match="VLMKIT_CPU_PRECISION='fp8': use fp32 or bf16"):
        resolve("cpu", "auto", cache_dir=tmp_path)


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


@pytest.fixture
def t4(monkeypatch):
    """A CUDA card without bf16 (a Tesla T4, compute capability 7.5), as torch reports it."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)


def test_a_decoder_that_overflows_in_fp16_gets_fp32_from_auto_and_refuses_fp16(t4):
    """Qwen2/2.5 overflow to NaN in fp16: its plugin declares it, and on a card without bf16
    ``auto`` (fp16 for other decoders) picks fp32 for it; an explicit fp16 is a one-line refusal."""
    assert resolve("cuda", "auto").precision == "fp16"
    placement = resolve("cuda", "auto", no_fp16="qwen2")
    assert placement.precision == "fp32" and "overflows in fp16" in placement.reason
    with pytest.raises(
        ConfigError, match="decoder 'qwen2' overflows in fp16.*--precision bf16.*or fp32"
    ) as exc:
        resolve("cuda", "fp16", no_fp16="qwen2")
    assert "\n" not in str(exc.value)
    assert resolve("cuda", "fp32", no_fp16="qwen2").precision == "fp32"


def test_the_qwen2_plugin_declares_fp16_unsafe_and_training_reads_the_declaration(t4):
    from vlmkit.core.registry import get_registry
    from vlmkit.train.config import TrainConfig
    from vlmkit.train.job import training_placement

    registry = get_registry()
    assert registry.decoder("qwen2").fp16_safe is False
    assert registry.decoder("smollm").fp16_safe is True

    def placement(decoder, precision="auto"):
        model = {"encoder": "siglip", "decoder": decoder}
        return training_placement(
            TrainConfig(model=model, datasets=[{"name": "shapes"}], device="cuda", precision=precision)
        )

    assert placement("qwen2").precision == "fp32"
    assert placement("smollm").precision == "fp16"
    with pytest.raises(ConfigError, match="precision fp16: decoder 'qwen2' overflows"):
        placement("qwen2", "fp16")
