"""The plugin module registers both specs through vlmkit's hooks, and imports no torch."""

from __future__ import annotations

import subprocess
import sys

from vlmkit.testing import registry_of

import vlmkit_plugin_example.plugin


def test_the_plugin_registers_a_decoder_and_a_dataset():
    registry = registry_of(vlmkit_plugin_example.plugin)

    assert not registry.broken
    assert registry.names("decoder") == ["mistral"]
    assert registry.names("dataset") == ["captions-csv"]
    assert registry.decoder("mistral").describe()["model_types"] == ["mistral"]


def test_importing_the_plugin_imports_no_torch():
    code = (
        "import sys, vlmkit_plugin_example.plugin; "
        "heavy = [m for m in ('torch', 'transformers', 'PIL') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env())
    assert result.returncode == 0, result.stderr


def _env():
    import os

    # pytest's pythonpath setting does not reach subprocesses
    src = os.path.join(os.path.dirname(os.path.dirname(__file__)), "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
