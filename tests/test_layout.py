"""The package layout keeps its promises: each folder one concern, arrows pointing down.

- core/ knows no model family or built-in plugin by name, imports nothing of the jobs, and stays
  small enough to read in an hour (<= 1,860 lines: the layout left it at 1,577; the hardened
  image loader and artifact file checks, device following, FSDP's block class, batch-norm-safe
  unfreezing, the model's own logits path and encoder options added ~100, each a core concern;
  what the LM must do, checked at build (core/lm.py: generate from embeddings, the token-id
  embedding scale, peft's refusals of LoRA targets) ~150);
- sdk/, train/, evaluate/ and export/ name no built-in plugin either: only plugins/ and recipes/ do;
- importing the config (and the CLI's help) imports no torch.

"Names" are code: identifiers and string literals that are not docstrings. Prose may mention a
family to explain a trap (why GPT-2's pad token is safe), code may not act on one.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vlmkit"
#: the packages that must not name a built-in plugin
NEUTRAL = ("core", "sdk", "train", "evaluate", "export")
#: plugin names that are also ordinary words (a folder, tensor shapes, np.clip): refused only as
#: a whole string literal ("shapes"), not inside messages or as identifiers
GENERIC = {"folder", "shapes", "clip"}


def builtin_names() -> set[str]:
    """Built-in plugin names (the entry points) and the embedded default's named checkpoints."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = set(project["entry-points"]["vlmkit"])
    from vlmkit.recipes import EMBEDDED_DEFAULT

    return names | {checkpoint for _, checkpoint in EMBEDDED_DEFAULT.values()}


def code_names(tree: ast.AST) -> list[tuple[int, str, str]]:
    """(line, kind, text) of every identifier and non-docstring string constant."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            out.append((node.lineno, "string", node.value))
        elif isinstance(node, ast.Name):
            out.append((node.lineno, "name", node.id))
        elif isinstance(node, ast.Attribute):
            out.append((node.lineno, "name", node.attr))
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            out.append((node.lineno, "name", node.name))
        elif isinstance(node, ast.alias):
            out.append((getattr(node, "lineno", 0), "name", node.name))
    return out


@pytest.mark.parametrize("package", NEUTRAL)
def test_no_builtin_plugin_is_named_outside_plugins_and_recipes(package):
    names = builtin_names()
    words = re.compile(r"\b(" + "|".join(re.escape(n) for n in sorted(names - GENERIC)) + r")\b", re.I)
    found = []
    for file in sorted((PACKAGE / package).rglob("*.py")):
        for line, kind, text in code_names(ast.parse(file.read_text())):
            named = (
                text.lower() in names - GENERIC
                if kind == "name"
                else (text.lower() in names or bool(words.search(text)))
            )
            if named:
                found.append(f"{file.relative_to(ROOT)}:{line}: {text!r}")
    assert not found, "built-in plugins named where only plugins/ and recipes/ may:\n" + "\n".join(found)


def test_core_imports_no_job_and_stays_small():
    lines = 0
    for file in sorted((PACKAGE / "core").glob("*.py")):
        text = file.read_text()
        lines += len(text.splitlines())
        for module in ("vlmkit.runtime", "vlmkit.train", "vlmkit.export", "vlmkit.evaluate", "vlmkit.recipes",
                       "vlmkit.cli", "vlmkit.plugins", "vlmkit.sdk"):  # fmt: skip
            assert not re.search(rf"^\s*(from|import) {re.escape(module)}\b", text, re.M), (
                f"{file.relative_to(ROOT)} imports {module}: core depends on nothing of ours above it"
            )
    assert lines <= 1860, f"core/ has {lines} lines; keep the contract and the model readable in an hour"


def test_sdk_imports_no_job():
    for file in sorted((PACKAGE / "sdk").glob("*.py")):
        text = file.read_text()
        for module in ("vlmkit.train", "vlmkit.export", "vlmkit.evaluate", "vlmkit.recipes", "vlmkit.cli"):
            assert not re.search(rf"^\s*(from|import) {re.escape(module)}\b", text, re.M), (
                f"{file.relative_to(ROOT)} imports {module}"
            )


def test_the_public_surface_imports_no_torch():
    code = (
        "import sys, vlmkit, vlmkit.core.config, vlmkit.testing; "
        "vlmkit.TransformersDecoderSpec; vlmkit.parse_options; "
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
