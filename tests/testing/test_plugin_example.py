"""A third-party plugin package, used the way its users use it.

``examples/vlmkit-plugin-example`` (a ``mistral`` decoder and a ``captions-csv`` dataset) and a
second plugin written here from nothing but ``docs/plugins.md`` are pip-installed, without their
dependencies, into a temporary folder that is then put on ``PYTHONPATH`` (subprocesses) or
``sys.path`` (this process). The development environment is never modified, so an interrupted
run leaves nothing behind, and "uninstalling" is leaving the folder off the path.

What this proves: the entry point is found, the specs pass vlmkit's contract suite, the real CLI
trains and captions with them end to end, and without them vlmkit keeps working.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vlmkit.core.errors import PluginError
from vlmkit.core.registry import Registry, reset_registry

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "vlmkit-plugin-example"
PLUGIN_MODULES = ("vlmkit_plugin_example", "vlmkit_sidecar")

# --------------------------------------------------------------- a plugin written from the guide

# Written by following docs/plugins.md only ("Datasets", "The hooks", "Publishing"), importing only
# the public surface (``vlmkit``), as the guide says: a dataset of
# images that each have a caption in a text file beside them (photo.png + photo.txt).
GUIDE_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "vlmkit-sidecar"
version = "0.3.0"
dependencies = ["vlmkit>=0.1"]

[project.entry-points.vlmkit]
sidecar = "vlmkit_sidecar.plugin"
"""

GUIDE_PLUGIN = '''\
"""Images with their captions in a text file beside each (photo.png + photo.txt)."""

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

import vlmkit
from vlmkit import (
    DEFAULT_FRACTIONS,
    DataError,
    ListDataset,
    SplitFractions,
    assign_split,
    check_split,
    fingerprint,
    parse_options,
)


class SidecarOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: Path = Field(description="folder of images, each with a .txt caption file beside it")
    split_fractions: SplitFractions = Field(DEFAULT_FRACTIONS, description="train/validation/test")


class SidecarDataset(vlmkit.DatasetSpec):
    name = "sidecar"
    description = "Images with a .txt caption file beside each"
    options = SidecarOptions

    def load(self, split, options=None, *, seed=0):
        opts = parse_options(self, options)
        check_split(split, f"sidecar {opts.path}")
        texts = sorted(opts.path.glob("*.txt"))
        if not texts:
            raise DataError(f"sidecar {opts.path}: no .txt caption files")
        examples, parts = [], []
        for text in texts:
            image = next((p for p in text.parent.glob(text.stem + ".*") if p.suffix != ".txt"), None)
            if image is None:
                raise DataError(f"sidecar {opts.path}: {text.name} has no image beside it")
            if assign_split(image.name, seed, opts.split_fractions) != split:
                continue
            captions = [line.strip() for line in text.read_text().splitlines() if line.strip()]
            examples.append(vlmkit.CaptionExample(id=image.name, captions=captions, image=str(image)))
            stat = image.stat()
            parts.append([image.name, stat.st_size, stat.st_mtime_ns, captions])
        if not examples:
            raise DataError(f"sidecar {opts.path}: split {split!r} is empty")
        return ListDataset(examples, fingerprint("sidecar", split, seed, parts), name="sidecar")


@vlmkit.hookimpl
def register_datasets(register):
    register(SidecarDataset())
'''

# ------------------------------------------------------------------------------------ helpers


def run_cli(*args: str, site: Path | None, **variables: str) -> subprocess.CompletedProcess:
    """``python -m vlmkit.cli.main ARGS`` in a fresh process, with ``site`` on ``PYTHONPATH``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLMKIT_")}
    env.pop("PYTHONPATH", None)
    if site is not None:
        env["PYTHONPATH"] = str(site)
    env.update(HF_HUB_OFFLINE="1", COLUMNS="250", **variables)
    return subprocess.run(
        [sys.executable, "-m", "vlmkit.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def write_images(folder: Path, n: int) -> list[tuple[str, str]]:
    """``n`` 32 px PNGs of coloured discs in ``folder/images``: ``(relative path, caption)`` each."""
    from PIL import Image, ImageDraw

    colours = ["red", "green", "blue", "yellow"]
    (folder / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        colour = colours[i % len(colours)]
        image = Image.new("RGB", (32, 32), "white")
        ImageDraw.Draw(image).ellipse((2 + i % 8, 4, 22 + i % 8, 24), fill=colour)
        relative = f"images/{i:02d}.png"
        image.save(folder / relative)
        rows.append((relative, f"A {colour} disc."))
    return rows


def write_captions_csv(folder: Path, n: int) -> Path:
    """``folder/captions.csv`` (``path,caption``) listing ``write_images(folder, n)``."""
    rows = write_images(folder, n)
    csv = folder / "captions.csv"
    csv.write_text("path,caption\n" + "".join(f"{path},{caption}\n" for path, caption in rows))
    return csv


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A folder holding vlmkit-plugin-example and vlmkit-sidecar, installed by pip."""
    tmp = tmp_path_factory.mktemp("plugins")
    # build from copies: a non-isolated build writes build/ and *.egg-info next to the sources
    example = shutil.copytree(
        EXAMPLE, tmp / "src" / "example", ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    guide = tmp / "src" / "sidecar"
    (guide / "vlmkit_sidecar").mkdir(parents=True)
    (guide / "pyproject.toml").write_text(GUIDE_PYPROJECT)
    (guide / "vlmkit_sidecar" / "__init__.py").write_text("")
    (guide / "vlmkit_sidecar" / "plugin.py").write_text(GUIDE_PLUGIN)
    target = tmp / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--no-cache-dir", "--no-compile", "--disable-pip-version-check", "--quiet",
         "--target", str(target), str(example), str(guide)],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return target


@pytest.fixture
def installed(site, monkeypatch):
    """``site`` on this process's ``sys.path``; the plugin modules are forgotten afterwards."""
    monkeypatch.syspath_prepend(str(site))
    reset_registry()
    yield site
    reset_registry()
    forget_plugin_modules()


def forget_plugin_modules() -> None:
    """Drop the installed plugins' modules, so no later test imports them from a stale path."""
    for name in list(sys.modules):
        if name.split(".")[0] in PLUGIN_MODULES:
            del sys.modules[name]


def entry_point_registry(**environ: str) -> Registry:
    """A registry loaded from the entry points on the current ``sys.path``, as the CLI loads it."""
    registry = Registry()
    registry.load_entry_points(environ=environ)
    return registry


@pytest.fixture(scope="module")
def checkpoints(site, tmp_path_factory) -> dict[str, str]:
    """Tiny random checkpoints: a Mistral-Instruct (the example's helper) and a CLIP encoder."""
    from vlmkit.testing import tiny_encoder_checkpoint

    tmp = tmp_path_factory.mktemp("checkpoints")
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(site))
        from vlmkit_plugin_example.testing import tiny_mistral_checkpoint

        mistral = tiny_mistral_checkpoint(tmp / "mistral")
    forget_plugin_modules()
    return {"mistral": mistral, "clip": tiny_encoder_checkpoint("clip", tmp / "clip")}


@pytest.fixture(scope="module")
def trained(site, checkpoints, tmp_path_factory) -> dict[str, Path]:
    """``vlmkit train`` in a fresh process, as a user runs it: the example's decoder and dataset."""
    tmp = tmp_path_factory.mktemp("trained")
    csv = write_captions_csv(tmp / "data", 16)
    # a run config file, because the --dataset flag's key=value,... syntax cannot carry a list
    config = {
        "datasets": [
            {"name": "captions-csv", "options": {"path": str(csv), "split_fractions": [0.5, 0.25, 0.25]}}
        ]
    }
    (tmp / "run.yaml").write_text(json.dumps(config))  # JSON is YAML
    out = tmp / "model"
    result = run_cli(
        "train", "--config", str(tmp / "run.yaml"),
        "--encoder", "clip", "--encoder-checkpoint", checkpoints["clip"],
        "--decoder", "mistral", "--decoder-checkpoint", checkpoints["mistral"],
        "--max-steps", "2", "--batch-size", "4",
        "--output", str(out), "--cache-dir", str(tmp / "cache"), "--quiet",
        site=site, VLMKIT_HOME=str(tmp / "home"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return {"model": out, "image": tmp / "data" / "images" / "00.png"}


# --------------------------------------------------------------------------------------- tests


def test_installing_adds_exactly_the_packages_specs_to_the_listing(site):
    without = run_cli("plugins", "list", "--json", site=None)
    result = run_cli("plugins", "list", "--json", site=site)

    assert result.returncode == 0, result.stderr
    assert result.stderr == without.stderr  # no new warning
    rows = json.loads(result.stdout)
    ours = {(r["kind"], r["name"], r["package"], r["version"], r["plugin"], r["error"]) for r in rows}
    ours -= {
        (r["kind"], r["name"], r["package"], r["version"], r["plugin"], r["error"])
        for r in json.loads(without.stdout)
    }
    assert ours == {
        ("decoder", "mistral", "vlmkit-plugin-example", "0.1.0", "example", None),
        ("dataset", "captions-csv", "vlmkit-plugin-example", "0.1.0", "example", None),
        ("dataset", "sidecar", "vlmkit-sidecar", "0.3.0", "sidecar", None),
    }

    disabled = run_cli("plugins", "list", "--json", site=site, VLMKIT_DISABLE_PLUGINS="example")
    names = {r["name"] for r in json.loads(disabled.stdout)}
    assert "sidecar" in names and not names & {"mistral", "captions-csv"}


def test_example_specs_pass_the_contract_suite_from_their_entry_point(installed, checkpoints, tmp_path):
    from vlmkit.testing import check_dataset, check_decoder

    registry = entry_point_registry(VLMKIT_PLUGINS="example")
    decoder, dataset = registry.decoder("mistral"), registry.dataset("captions-csv")
    assert Path(sys.modules[type(decoder).__module__].__file__).is_relative_to(installed)

    report = check_decoder(decoder, checkpoints["mistral"], tmp_path)
    assert report["lora_targets"] == ["q_proj", "k_proj", "v_proj", "o_proj"]

    csv = write_captions_csv(tmp_path / "data", 16)
    sizes = check_dataset(dataset, {"path": str(csv), "split_fractions": [0.5, 0.25, 0.25]})
    assert sum(sizes.values()) == 16


def test_a_plugin_written_from_the_guide_alone_passes_the_contract_suite(installed, tmp_path):
    from vlmkit.testing import check_dataset

    for path, caption in write_images(tmp_path, 16):
        (tmp_path / path).with_suffix(".txt").write_text(caption + "\n")
    dataset = entry_point_registry(VLMKIT_PLUGINS="sidecar").dataset("sidecar")

    sizes = check_dataset(dataset, {"path": str(tmp_path / "images"), "split_fractions": [0.5, 0.25, 0.25]})

    assert sum(sizes.values()) == 16


def test_train_and_caption_end_to_end_with_the_example_plugin(trained, installed):
    from typer.testing import CliRunner

    from vlmkit.cli.main import app

    manifest = json.loads((trained["model"] / "vlmkit.json").read_text())
    assert (manifest["decoder"]["plugin"], manifest["decoder"]["model_type"]) == ("mistral", "mistral")

    # in this process (a second fresh process would only import torch again): the same CLI app,
    # with the plugin found through its entry point
    model, image = str(trained["model"]), str(trained["image"])
    result = CliRunner().invoke(app, ["caption", "--model", model, "--json", "--max-new-tokens", "4", image])

    assert result.exit_code == 0, result.output
    (line,) = result.stdout.splitlines()
    record = json.loads(line)
    assert record["path"] == image and record["error"] is None
    assert isinstance(record["caption"], str)


def test_without_the_package_vlmkit_works_and_a_model_needing_it_is_refused(trained):
    listed = run_cli("plugins", "list", "--json", site=None)
    assert listed.returncode == 0, listed.stderr
    names = {r["name"] for r in json.loads(listed.stdout)}
    assert not names & {"mistral", "captions-csv", "sidecar"}
    assert {"smollm", "clip", "shapes"} <= names

    shown = run_cli("plugins", "show", "mistral", site=None)
    assert shown.returncode == 1
    assert "error: no plugin named 'mistral'" in shown.stderr

    from vlmkit.core.model import PrefixConditioningVLM

    with pytest.raises(PluginError, match=r"needs a plugin that is not available: unknown decoder 'mistral'"):
        PrefixConditioningVLM.load(trained["model"], registry=entry_point_registry())
