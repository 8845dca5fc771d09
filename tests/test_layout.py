"""The package layout keeps its promises: each folder one concern, arrows pointing down.

- every import (at module level or inside a function) points down the layers
  ``cli > testing > jobs (train, evaluate, export, recipes) > plugins > the public API (vlmkit)
  > sdk, runtime > core``; core imports nothing of ours above it;
- plugins import only the public API (``vlmkit``), the sdk and their own package: the path a
  third-party plugin takes;
- the public API imports core alone (its toolkit names load the sdk on first use), never a job;
- no import circle, between modules or between packages;
- core/, sdk/, train/, evaluate/ and export/ name no built-in plugin: only plugins/ and recipes/ do;
- importing the configs (and the CLI's help) imports no torch.

The direction of imports is the rule; the size of a package is not (a line count is a smell to
look at, not a budget to meet).

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


#: package -> its layer; an import may point to a lower layer, or within its own package
LAYERS = {
    "core": 0,
    "sdk": 1,
    "runtime": 1,
    "": 2,  # vlmkit/__init__.py: the public API
    "plugins": 3,
    "train": 4,
    "evaluate": 4,
    "export": 4,
    "recipes": 4,
    "testing": 5,
    "cli": 6,
}
JOBS = ("train", "evaluate", "export", "recipes")


def module_name(file: Path) -> str:
    parts = list(file.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every vlmkit module -> the vlmkit modules it imports, wherever the import statement stands
    (``from vlmkit.core import artifact`` is an import of ``vlmkit.core.artifact``)."""
    files = {module_name(f): f for f in sorted(PACKAGE.rglob("*.py"))}
    graph = {}
    for name, file in files.items():
        package = name if file.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, *([node.module] if node.module else [])])
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.add(full if full in files else base)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def package_of(module: str) -> str:
    """``vlmkit.train.job`` -> ``train``; the public API ``vlmkit`` -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_import_points_down_the_layers():
    wrong = []
    for module, targets in import_graph().items():
        here = package_of(module)
        for target in sorted(targets):
            there = package_of(target)
            if there != here and LAYERS[there] >= LAYERS[here] and not (here in JOBS and there in JOBS):
                wrong.append(f"{module} imports {target} ({there or 'the public API'} is not below {here})")
    assert LAYERS.keys() >= {package_of(m) for m in import_graph()}, "a new package needs a layer here"
    assert not wrong, "imports pointing up or sideways:\n" + "\n".join(wrong)


def test_plugins_import_only_the_public_api_the_sdk_and_their_own_package():
    wrong = [
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        if package_of(module) == "plugins"
        for target in sorted(targets)
        if package_of(target) not in ("", "sdk", "plugins")
    ]
    assert not wrong, "a plugin takes the third-party path (vlmkit, vlmkit.sdk):\n" + "\n".join(wrong)


def test_the_public_api_imports_core_alone_and_loads_only_the_sdk_lazily():
    import vlmkit

    assert {package_of(t) for t in import_graph()["vlmkit"]} <= {"core"}
    lazy = {module.split(".")[1] for module in vlmkit._LAZY.values()}
    assert lazy <= {"core", "sdk"}, f"the public API must not load a job: {lazy}"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circle_between_modules_or_packages():
    graph = import_graph()
    assert not cycles(graph), f"modules importing each other: {cycles(graph)}"
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        packages.setdefault(package_of(module), set()).update(package_of(t) for t in targets)
    packages = {p: t - {p} for p, t in packages.items()}
    assert not cycles(packages), f"packages importing each other: {cycles(packages)}"


def test_the_circle_check_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_public_surface_imports_no_torch():
    code = (
        "import sys, vlmkit, vlmkit.core.config, vlmkit.testing; "
        "vlmkit.TransformersDecoderSpec; vlmkit.parse_options; "
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
