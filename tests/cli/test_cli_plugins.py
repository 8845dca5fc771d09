"""``vlmkit plugins list|show``, run as a user runs them: the real CLI in a subprocess.

Third-party plugins are fake installed distributions in a folder on ``PYTHONPATH``, so the CLI
process finds them through entry points exactly as it finds a pip-installed plugin.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import vlmkit

ACME_PLUGIN = '''
"""Acme's vlmkit plugin: one decoder, one encoder."""
import vlmkit


class AcmeLM(vlmkit.DecoderSpec):
    name = "acme-lm"
    description = "Acme's tiny language model"
    default_checkpoint = "acme/tiny-lm"
    checkpoints = {"acme-tiny": "10M parameters, for tests"}
    model_types = ("acme",)
    lora_targets = ("q_proj", "v_proj")
    layer_class = "AcmeBlock"

    def load(self, checkpoint=None, *, revision=None, dtype=None):
        import torch  # noqa: F401 - heavy imports live inside load, never at module level

    def format(self, tokenizer, prompt, caption, style="auto"):
        return vlmkit.Formatted(before=[], after=[])

    def stop_token_ids(self, tokenizer, style="auto"):
        return [0]

    def resolve_lora_targets(self, model):
        return list(self.lora_targets)


class AcmeViT(vlmkit.EncoderSpec):
    name = "acme-vit"
    default_checkpoint = "acme/vit-tiny"

    def load(self, checkpoint=None, *, revision=None):
        raise NotImplementedError


@vlmkit.hookimpl
def register_decoders(register):
    register(AcmeLM())


@vlmkit.hookimpl
def register_encoders(register):
    register(AcmeViT())
'''

BROKEN_ON_IMPORT = "raise RuntimeError('acme-gpu needs CUDA')\n"

BROKEN_IN_HOOK = """
import vlmkit

@vlmkit.hookimpl
def register_datasets(register):
    raise KeyError("ACME_DATA_DIR")
"""


def cli_env(site: Path | None = None, **variables: str) -> dict[str, str]:
    """This environment without ``VLMKIT_*`` variables, plus ``variables`` and ``site`` on ``PYTHONPATH``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLMKIT_")}
    env["COLUMNS"] = "250"  # rich wraps table cells to the terminal width
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return env | variables


def run_cli(
    *args: str, site: Path | None = None, plugins: str | None = None, **variables: str
) -> subprocess.CompletedProcess:
    """``python -m vlmkit.cli.main ARGS`` as a user runs it; ``plugins`` sets ``VLMKIT_PLUGINS``."""
    if plugins is not None:
        variables["VLMKIT_PLUGINS"] = plugins
    return subprocess.run(
        [sys.executable, "-m", "vlmkit.cli.main", *args],
        env=cli_env(site, **variables),
        capture_output=True,
        text=True,
        timeout=60,
    )


def warning_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("warning:")]


@pytest.fixture
def acme(fake_site):
    fake_site.add_dist("acme-vlm-plugin", {"acme": ACME_PLUGIN}, version="1.0")
    return fake_site


# ------------------------------------------------------------------------ list


def test_list_json_shows_each_spec_with_its_package_and_version(acme):
    result = run_cli("plugins", "list", "--json", site=acme.path, plugins="acme")

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert json.loads(result.stdout) == [
        {
            "name": "acme-vit",
            "kind": "encoder",
            "package": "acme-vlm-plugin",
            "version": "1.0",
            "plugin": "acme",
            "default_checkpoint": "acme/vit-tiny",
            "description": "",
            "error": None,
        },
        {
            "name": "acme-lm",
            "kind": "decoder",
            "package": "acme-vlm-plugin",
            "version": "1.0",
            "plugin": "acme",
            "default_checkpoint": "acme/tiny-lm",
            "description": "Acme's tiny language model",
            "error": None,
        },
    ]


def test_list_json_shows_a_clash_on_both_providers_and_show_names_both(acme):
    acme.add_dist("other-vlm-plugin", {"other": acme.specs(decoders=["acme-lm", "other-lm"])}, version="2.3")

    listed = run_cli("plugins", "list", "--json", site=acme.path, plugins="acme,other")
    rows = {(r["name"], r["package"]): r for r in json.loads(listed.stdout)}
    assert listed.returncode == 0, listed.stderr
    assert rows["acme-lm", "acme-vlm-plugin"]["error"] == "name registered by more than one plugin"
    assert rows["acme-lm", "other-vlm-plugin"]["error"] == "name registered by more than one plugin"
    assert rows["other-lm", "other-vlm-plugin"]["error"] is None

    shown = run_cli("plugins", "show", "acme-lm", site=acme.path, plugins="acme,other")
    assert shown.returncode == 1
    assert shown.stdout == ""
    assert shown.stderr.count("\n") == 1
    assert shown.stderr.startswith("error: decoder name 'acme-lm' is registered by both acme-vlm-plugin")
    assert "other-vlm-plugin" in shown.stderr

    other = run_cli("plugins", "show", "other-lm", site=acme.path, plugins="acme,other")
    assert other.returncode == 0, other.stderr


def test_broken_plugins_are_listed_with_their_error_and_one_warning_line(acme):
    acme.add_dist("acme-extras", {"acme-gpu": BROKEN_ON_IMPORT, "acme-data": BROKEN_IN_HOOK}, version="0.2")
    plugins = "acme,acme-gpu,acme-data"

    table = run_cli("plugins", "list", site=acme.path, plugins=plugins)
    assert table.returncode == 0, table.stderr
    assert "Traceback" not in table.stderr
    (warning,) = warning_lines(table)
    assert table.stderr.strip() == warning
    where = acme.path / "acme_extras" / "acme_gpu.py"
    assert (
        f"acme-gpu from acme-extras (import failed at {where}:1: RuntimeError: acme-gpu needs CUDA)"
        in warning
    )
    assert "acme-data from acme-extras (register_datasets failed: KeyError: 'ACME_DATA_DIR')" in warning
    assert "acme-lm" in table.stdout and "acme-vit" in table.stdout
    assert "RuntimeError: acme-gpu needs CUDA" in table.stdout
    assert "error: register_datasets failed: KeyError: 'ACME_DATA_DIR'" in table.stdout

    listed = run_cli("plugins", "list", "--json", site=acme.path, plugins=plugins)
    broken = {r["plugin"]: r for r in json.loads(listed.stdout) if r["kind"] == "broken"}
    assert set(broken) == {"acme-gpu", "acme-data"}
    assert broken["acme-gpu"]["package"] == "acme-extras" and broken["acme-gpu"]["version"] == "0.2"

    # everything else keeps working
    shown = run_cli("plugins", "show", "acme-lm", site=acme.path, plugins=plugins)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["name"] == "acme-lm"
    assert len(warning_lines(shown)) == 1

    # asking for a broken plugin by its entry-point name says why it is missing
    missing = run_cli("plugins", "show", "acme-gpu", site=acme.path, plugins=plugins)
    assert missing.returncode == 1
    assert (
        f"error: plugin 'acme-gpu' from acme-extras is broken: import failed at {where}:1: RuntimeError"
        in missing.stderr
    )
    assert "Traceback" not in missing.stderr


def test_debug_prints_full_tracebacks_and_an_unmatched_filter_entry_is_one_warning(acme):
    acme.add_dist("acme-extras", {"acme-gpu": "import acme_extras.deep\n", "deep": BROKEN_ON_IMPORT})

    listed = run_cli("--debug", "plugins", "list", "--json", site=acme.path, plugins="acme,acme-gpu")
    assert listed.returncode == 0, listed.stderr
    (warning,) = warning_lines(listed)
    assert f"import failed at {acme.path / 'acme_extras' / 'deep.py'}:1: RuntimeError" in warning
    # after the one line, the whole chain: from the plugin module down to the line that raised
    trace = listed.stderr.split(warning, 1)[1]
    assert trace.lstrip().startswith("Traceback (most recent call last)")
    assert "acme_gpu.py" in trace and "deep.py" in trace and "RuntimeError: acme-gpu needs CUDA" in trace

    # VLMKIT_DEBUG=1 does what --debug does, for an error too; a typo in VLMKIT_PLUGINS is one warning
    missing = run_cli(
        "plugins", "show", "nothing-here", site=acme.path, plugins="acme,acme-lm", VLMKIT_DEBUG="1"
    )
    assert missing.returncode == 1
    (warning,) = warning_lines(missing)
    assert warning.startswith("warning: VLMKIT_PLUGINS entry 'acme-lm' matches no installed vlmkit plugin")
    assert "Traceback (most recent call last)" in missing.stderr
    assert missing.stderr.rstrip().splitlines()[-1].startswith("error: no plugin named 'nothing-here'")


def test_invalid_specs_are_listed_as_broken_plugins(acme):
    invalid = {  # entry point: (hook, what it registers)
        "class-not-instance": ("register_encoders", "AcmeViT"),
        "wrong-kind": ("register_datasets", "AcmeViT()"),
        "uppercase": ("register_encoders", "type('Loud', (AcmeViT,), {'name': 'AcmeViT'})()"),
    }
    acme.add_dist(
        "acme-invalid",
        {
            entry_point: "import vlmkit\nfrom acme_vlm_plugin.acme import AcmeViT\n\n"
            f"@vlmkit.hookimpl\ndef {hook}(register):\n    register({spec})\n"
            for entry_point, (hook, spec) in invalid.items()
        },
    )
    result = run_cli("plugins", "list", "--json", site=acme.path, plugins="acme," + ",".join(invalid))

    assert result.returncode == 0, result.stderr
    errors = {r["plugin"]: r["error"] for r in json.loads(result.stdout) if r["kind"] == "broken"}
    assert errors == {
        "class-not-instance": "register_encoders failed: PluginError: register an instance, not the class: "
        "register(AcmeViT())",
        "wrong-kind": "register_datasets failed: PluginError: AcmeViT is not a DatasetSpec (registered as a dataset)",
        "uppercase": "register_encoders failed: PluginError: Loud.name must be an exact lowercase name like "
        "'my-decoder', got 'AcmeViT'",
    }
    assert len(warning_lines(result)) == 1
    assert {r["name"] for r in json.loads(result.stdout) if r["kind"] != "broken"} == {"acme-lm", "acme-vit"}


def test_allow_and_deny_lists_limit_what_the_cli_loads(acme):
    acme.add_dist(
        "acme-extras", {"acme-gpu": BROKEN_ON_IMPORT, "acme-more": acme.specs(datasets=["acme-captions"])}
    )

    only = run_cli("plugins", "list", "--json", site=acme.path, plugins="acme-more")
    assert [(r["name"], r["plugin"]) for r in json.loads(only.stdout)] == [("acme-captions", "acme-more")]
    assert only.stderr == ""

    denied = run_cli("plugins", "list", "--json", site=acme.path, VLMKIT_DISABLE_PLUGINS="acme-gpu")
    plugins = {r["plugin"] for r in json.loads(denied.stdout)}
    assert {"acme", "acme-more"} <= plugins
    assert "acme-gpu" not in plugins
    assert "acme-gpu" not in denied.stderr


def test_list_kind_filters_and_rejects_an_unknown_kind(acme):
    decoders = run_cli("plugins", "list", "--json", "--kind", "decoder", site=acme.path, plugins="acme")
    assert [r["name"] for r in json.loads(decoders.stdout)] == ["acme-lm"]

    bad = run_cli("plugins", "list", "--kind", "model", site=acme.path, plugins="acme")
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert "must be one of encoder, decoder, dataset" in bad.stderr


# ------------------------------------------------------------------------ show


def test_show_prints_the_declared_fields_as_json(acme):
    result = run_cli("plugins", "show", "acme-lm", site=acme.path, plugins="acme")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "kind": "decoder",
        "name": "acme-lm",
        "description": "Acme's tiny language model",
        "default_checkpoint": "acme/tiny-lm",
        "checkpoints": {"acme-tiny": "10M parameters, for tests"},
        "model_types": ["acme"],
        "lora_targets": ["q_proj", "v_proj"],
        "layer_class": "AcmeBlock",
        "fp16_safe": True,  # a declaration with a default: shown too
        "package": "acme-vlm-plugin",
        "package_version": "1.0",
        "plugin": "acme",
    }


def test_show_unknown_name_is_a_one_line_error_with_a_suggestion(acme):
    result = run_cli("plugins", "show", "acme-ln", site=acme.path, plugins="acme")

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        "error: no plugin named 'acme-ln'; did you mean 'acme-lm'? Available: acme-lm, acme-vit. "
        "See 'vlmkit plugins list'.\n"
    )


def test_show_unknown_name_within_a_kind(acme):
    result = run_cli("plugins", "show", "acme-lm", "--kind", "encoder", site=acme.path, plugins="acme")

    assert result.returncode == 1
    assert result.stderr.startswith("error: unknown encoder 'acme-lm'")
    assert "Available encoders: acme-vit." in result.stderr
    assert result.stderr.count("\n") == 1


# ------------------------------------------------------------------------ start-up stays light

HEAVY = ("torch", "transformers", "timm", "peft", "datasets", "PIL", "numpy")

IMPORTS_AFTER = """
import sys
sys.argv = ["vlmkit", *sys.argv[1:]]
from vlmkit.cli.main import main
try:
    main()
except SystemExit:
    pass
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})
print("HEAVY-MODULES", heavy, file=sys.stderr)
"""


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["--version"],
        ["plugins", "list"],
        *([cmd, "--help"] for cmd in ("train", "eval", "export", "caption", "demo", "inspect")),
    ],
    ids=" ".join,
)
def test_light_commands_import_no_ml_library(args):
    # Every installed plugin is loaded (no VLMKIT_PLUGINS): a built-in plugin that imports torch at
    # module level fails here.
    script = IMPORTS_AFTER.format(heavy=set(HEAVY))
    result = subprocess.run(
        [sys.executable, "-c", script, *args], env=cli_env(), capture_output=True, text=True, timeout=60
    )
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("HEAVY-MODULES")]
    assert line == "HEAVY-MODULES []", result.stderr


# ------------------------------------------------------------------------ the command itself


def test_console_script_prints_version_and_help():
    script = Path(sysconfig.get_path("scripts")) / "vlmkit"
    if not script.exists():
        pytest.skip(f"console script not installed at {script}")
    version = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert (version.returncode, version.stdout) == (0, f"vlmkit {vlmkit.__version__}\n")

    helped = run_cli("--help")
    assert helped.returncode == 0
    assert "Usage: vlmkit" in helped.stdout and "plugins" in helped.stdout


def test_usage_errors_exit_2_without_traceback():
    result = run_cli("plugins", "nonsense")
    assert result.returncode == 2
    assert "No such command 'nonsense'" in result.stderr
    assert "Traceback" not in result.stderr
