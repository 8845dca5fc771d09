"""The CLI reference (docs/cli.md), generated from the Typer app itself.

It walks ``vlmkit.cli.main.app`` as click sees it (every command and sub-command, every option
and argument: its names, type, default, help and help panel), so the page says what
``vlmkit COMMAND --help`` says and cannot fall behind the code. It reads the app, never a list of
options: however the commands are built (by hand, or generated from the pydantic configs), what
click parses is what is documented.

The site's build (``mkdocs build``, see docs/hooks.py) calls ``render()``; to read the page
without building the site:

    python docs/gen_cli.py            # the markdown on stdout
    python docs/gen_cli.py -o cli.md  # into a file
"""

from __future__ import annotations

import argparse
import html
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

#: the trailing "  [default: x; required; x>=1]" that click and Typer append to an option's help
EXTRA = re.compile(r"^(?P<help>.*?)\s*\[(?P<extra>[^\[\]]*)\]$", re.DOTALL)
DEFAULT_PANEL = "Options"


@dataclass
class Param:
    """One option or argument as ``--help`` shows it."""

    names: list[str]
    kind: str  # "option" or "argument"
    type: str
    default: str
    help: str
    notes: list[str]  # "required", a range ("x>=1"), an environment variable
    panel: str


@dataclass
class Command:
    """One command (``vlmkit``, ``vlmkit train``, ``vlmkit plugins list``, ...)."""

    path: str
    usage: str
    help: str
    params: list[Param]
    subcommands: list[str] = field(default_factory=list)


def click_app():
    """The click command behind ``vlmkit`` (Typer builds it from ``vlmkit.cli.main.app``)."""
    import typer.main

    from vlmkit.cli.main import app

    return typer.main.get_command(app)


def walk(command=None, ctx=None, name: str = "vlmkit") -> Iterator[Command]:
    """Every command, depth first in the order ``--help`` lists them, hidden ones left out."""
    command = command if command is not None else click_app()
    ctx = command.context_class(command, info_name=name, parent=ctx)  # Typer's own click or click
    subcommands = _subcommands(command, ctx)
    yield Command(
        path=ctx.command_path,
        usage=f"{ctx.command_path} {' '.join(command.collect_usage_pieces(ctx))}".strip(),
        help=_command_help(command),
        params=[p for p in (_param(param, ctx) for param in command.get_params(ctx)) if p is not None],
        subcommands=[sub_name for sub_name, _ in subcommands],
    )
    for sub_name, sub in subcommands:
        yield from walk(sub, ctx, sub_name)


def _subcommands(command, ctx) -> list[tuple[str, object]]:
    if not hasattr(command, "list_commands"):
        return []
    found = [(name, command.get_command(ctx, name)) for name in command.list_commands(ctx)]
    return [(name, sub) for name, sub in found if sub is not None and not getattr(sub, "hidden", False)]


def _command_help(command) -> str:
    text = (command.help or "").split("\f")[0]  # click's convention: nothing after a form feed
    lines = [line for line in text.strip().splitlines() if line.strip() != "\b"]
    return "\n".join(lines)


def _param(param, ctx) -> Param | None:
    if getattr(param, "hidden", False) or param.name == "help":
        return None
    record = param.get_help_record(ctx)
    if record is None:
        return None
    help_text, notes = record[1], []
    match = EXTRA.match(help_text)
    if match:
        help_text = match["help"]
        notes = [note.strip() for note in match["extra"].split(";") if note.strip()]
    default = next((n.partition(":")[2].strip() for n in notes if n.startswith("default:")), "")
    notes = [n for n in notes if not n.startswith("default:")]
    kind = getattr(param, "param_type_name", "option")
    if kind == "argument":
        names = [getattr(param, "human_readable_name", param.name)]
    else:
        names = list(param.opts) + list(getattr(param, "secondary_opts", []))
    panel = getattr(param, "rich_help_panel", None)
    return Param(
        names=names,
        kind=kind,
        type=_type_name(param, ctx),
        default=default,
        help=help_text.strip(),
        notes=notes,
        panel=panel
        if isinstance(panel, str) and panel
        else ("Arguments" if kind == "argument" else DEFAULT_PANEL),
    )


def _type_name(param, ctx) -> str:
    display = getattr(param, "display_type", None)  # Typer 0.2x: "<int>", "<onnx|web|hf>", ...
    if callable(display):
        return display(ctx)
    kind = getattr(param, "type", None)  # click: its ParamType's name
    if getattr(param, "is_flag", False):
        return "flag"
    choices = getattr(kind, "choices", None)
    return "|".join(map(str, choices)) if choices else str(getattr(kind, "name", "") or "")


def _cell(text: str) -> str:
    """``text`` safe inside a markdown table cell."""
    return html.escape(" ".join(text.split()), quote=False).replace("|", "&#124;").replace("*", "&#42;")


def render(commands: list[Command] | None = None) -> str:
    """The CLI reference page, in markdown."""
    commands = commands if commands is not None else list(walk())
    out = [
        "# CLI reference",
        "",
        "Generated from the `vlmkit` command itself (`vlmkit.cli.main.app`) by `docs/gen_cli.py` when",
        "the site is built: it is what `vlmkit COMMAND --help` prints, command by command. Every",
        "command also takes `-h`/`--help`.",
        "",
    ]
    out += [f"- [`{c.path}`](#{_anchor(c.path)})" for c in commands]
    for command in commands:
        out += [
            "",
            f"## `{command.path}` {{#{_anchor(command.path)}}}",
            "",
            "```text",
            command.usage,
            "```",
            "",
        ]
        if command.help:
            out += [html.escape(command.help, quote=False), ""]
        if command.subcommands:
            out += [
                "Commands: "
                + ", ".join(f"[`{s}`](#{_anchor(f'{command.path} {s}')})" for s in command.subcommands),
                "",
            ]
        panels: dict[str, list[Param]] = {}
        for param in command.params:
            panels.setdefault(param.panel, []).append(param)
        for panel, params in panels.items():
            out += [f"**{panel}**", "", "| option | type | default | description |", "|---|---|---|---|"]
            for p in params:
                names = " ".join(f"`{n}`" for n in p.names)
                type_ = f"`{p.type}`" if p.type else ""
                default = f"`{p.default}`" if p.default else ""
                notes = f" ({'; '.join(p.notes)})" if p.notes else ""
                out.append(f"| {names} | {type_} | {default} | {_cell(p.help + notes)} |")
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def _anchor(path: str) -> str:
    return path.replace(" ", "-")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the vlmkit CLI reference (markdown).")
    parser.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    args = parser.parse_args(argv)
    text = render()
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
