"""The documentation: the site builds with --strict, its CLI reference covers the CLI as it is, and
README's links and commands are true."""

from __future__ import annotations

import html
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: a markdown link or image: [text](target) / ![alt](target), and HTML src=/href=
LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)|(?:src|href)=\"([^\"]+)\""
)


def _gen_cli():
    spec = importlib.util.spec_from_file_location("gen_cli", ROOT / "docs" / "gen_cli.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _click_commands():
    """``{"vlmkit train": click command, ...}`` read from the Typer app, independently of gen_cli."""
    import typer.main

    from vlmkit.cli.main import app

    found, todo = {}, [("vlmkit", typer.main.get_command(app))]
    while todo:
        path, command = todo.pop()
        found[path] = command
        for name, sub in getattr(command, "commands", {}).items():
            if not sub.hidden:
                todo.append((f"{path} {name}", sub))
    return found


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed: pip install -e '.[docs]' (make test installs it)")
    out = tmp_path_factory.mktemp("site")
    # the hook imports this checkout's vlmkit to generate the CLI reference
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, f"mkdocs build --strict failed:\n{build.stdout}\n{build.stderr}"
    return out


def test_the_site_builds_with_every_page(site):
    for page in ("index.html", "cli/index.html", "training/index.html", "plugins/index.html",
                 "benchmarks/RESULTS/index.html", "benchmarks/QUALITY/index.html"):  # fmt: skip
        assert (site / page).is_file(), page


def test_every_cli_command_and_option_is_in_the_generated_reference(site):
    page = (site / "cli" / "index.html").read_text(encoding="utf-8")
    # one section per command, from its heading to the next
    sections = dict(re.findall(r'<h2 id="([^"]+)".*?</h2>(.*?)(?=<h2 |\Z)', page, re.DOTALL))
    commands = _click_commands()
    assert len(commands) >= 8, sorted(commands)  # vlmkit, its seven commands, plugins list/show
    for path, command in commands.items():
        anchor = path.replace(" ", "-")
        assert anchor in sections, f"{path!r} has no section in the CLI reference"
        text = html.unescape(re.sub(r"<[^>]+>", " ", sections[anchor]))
        assert f"{path} " in text, f"{path}: no usage line"
        for param in command.params:
            if param.hidden or param.name == "help":
                continue
            names = [*param.opts, *getattr(param, "secondary_opts", [])]
            if getattr(param, "param_type_name", "option") == "argument":
                names = [getattr(param, "human_readable_name", param.name)]
            for name in names:
                assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text), f"{path}: {name} is missing"


def test_the_reference_is_read_from_the_app_not_written_by_hand():
    """Any Typer app: a command, an option with its type, default, help and panel, an argument."""
    import typer
    import typer.main

    app = typer.Typer(add_completion=False)

    @app.command()
    def fetch(
        url: str = typer.Argument(..., help="Where from."),
        retries: int = typer.Option(
            3, "--retries", min=0, help="Tries after the first.", rich_help_panel="Network"
        ),
        colour: bool = typer.Option(False, "--colour/--no-colour", help="Colour | the output."),
    ) -> None:
        """Fetch one URL.

        A second paragraph.
        """

    @app.command(hidden=True)
    def secret() -> None:
        """Not documented."""

    gen_cli = _gen_cli()
    commands = list(gen_cli.walk(typer.main.get_command(app), name="tool"))
    text = gen_cli.render(commands)
    assert [c.path for c in commands] == ["tool", "tool fetch"]
    fetch_params = {p.names[0]: p for p in commands[1].params}
    assert fetch_params["--retries"].panel == "Network"
    assert fetch_params["--retries"].default == "3"
    assert fetch_params["--colour"].names == ["--colour", "--no-colour"]
    assert fetch_params["--colour"].panel == "Options"
    assert fetch_params["url"].kind == "argument" and fetch_params["url"].notes == ["required"]
    assert "**Network**" in text and "A second paragraph." in text
    assert "| `--retries` | `" in text and "Tries after the first. (x&gt;=0)" in text
    assert "Colour &#124; the output." in text  # a | in help does not split the table row
    assert "secret" not in text


def test_readme_relative_links_resolve():
    text = README.read_text(encoding="utf-8")
    targets = [a or b for a, b in LINK.findall(text)]
    relative = [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]
    assert len(relative) >= 10, relative  # the front page links into docs/
    missing = [t for t in relative if not (ROOT / t.partition("#")[0]).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"


def test_readme_make_commands_are_makefile_targets():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([\w.-]+):", makefile, re.MULTILINE))
    used = set(re.findall(r"(?<![\w-])make ([a-z][\w-]*)", README.read_text(encoding="utf-8")))
    assert {"demo", "test"} <= used
    assert used <= targets, f"README names make targets the Makefile lacks: {sorted(used - targets)}"
