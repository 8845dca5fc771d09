"""``vlmkit plugins list`` and ``vlmkit plugins show``."""

from __future__ import annotations

import json
from typing import NoReturn

import typer

from vlmkit.core.errors import PluginError
from vlmkit.core.registry import KINDS, did_you_mean, get_registry

app = typer.Typer(help="List and inspect encoder, decoder and dataset plugins.", no_args_is_help=True)


def _rows() -> list[dict]:
    registry = get_registry()
    rows = []
    for reg in registry.all():
        clash = (reg.kind, reg.name) in registry.clashes
        rows.append(
            {
                "name": reg.name,
                "kind": reg.kind,
                "package": reg.provider.package,
                "version": reg.provider.version,
                "plugin": reg.provider.plugin,
                "default_checkpoint": reg.spec.default_checkpoint,
                "description": reg.spec.description,
                "error": "name registered by more than one plugin" if clash else None,
            }
        )
    for broken in registry.broken:
        rows.append(
            {
                "name": broken.provider.plugin,
                "kind": "broken",
                "package": broken.provider.package,
                "version": broken.provider.version,
                "plugin": broken.provider.plugin,
                "default_checkpoint": None,
                "description": None,
                "error": broken.error,
            }
        )
    return rows


@app.command("list")
def list_plugins(
    kind: str = typer.Option(None, "--kind", help=f"Only this kind: {', '.join(KINDS)}."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (one object per plugin) for scripts."),
) -> None:
    """List every registered plugin: name, kind, providing package, default checkpoint.

    Broken plugins (failed to import or register) are listed with their error.
    """
    _check_kind(kind)
    rows = _rows()
    if kind:
        rows = [r for r in rows if r["kind"] in (kind, "broken")]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="vlmkit plugins", show_lines=False)
    for col in ("name", "kind", "package", "default checkpoint", "description"):
        table.add_column(col, overflow="fold")
    for r in rows:
        package = f"{r['package']} {r['version'] or ''}".strip()
        if r["error"]:
            table.add_row(r["name"], r["kind"], package, "", f"[red]error: {r['error']}[/red]")
        else:
            table.add_row(
                r["name"], r["kind"], package, r["default_checkpoint"] or "", r["description"] or ""
            )
    Console().print(table)


@app.command("show")
def show(
    name: str = typer.Argument(..., help="Plugin name, e.g. siglip, qwen2, shapes."),
    kind: str = typer.Option(None, "--kind", help="Disambiguate when one name exists in several kinds."),
) -> None:
    """Print everything a plugin's spec declares (JSON)."""
    _check_kind(kind)
    registry = get_registry()
    kinds = [kind] if kind else [k for k in KINDS if name in registry.names(k)]
    if not kinds:
        _unknown(registry, name)
    out = []
    for k in kinds:
        reg = registry.registration(k, name)
        info = reg.spec.describe()
        info["package"] = reg.provider.package
        info["package_version"] = reg.provider.version
        info["plugin"] = reg.provider.plugin
        out.append(info)
    typer.echo(json.dumps(out[0] if len(out) == 1 else out, indent=2))


def _check_kind(kind: str | None) -> None:
    if kind is not None and kind not in KINDS:
        raise typer.BadParameter(f"must be one of {', '.join(KINDS)}, got {kind!r}", param_hint="--kind")


def _unknown(registry, name: str) -> NoReturn:
    for broken in registry.broken:
        if broken.provider.plugin == name:
            raise PluginError(f"plugin {name!r} from {broken.provider.package} is broken: {broken.error}")
    every = sorted({n for k in KINDS for n in registry.names(k)})
    hint = did_you_mean(name, every)
    raise PluginError(
        f"no plugin named {name!r}{hint} Available: {', '.join(every) or 'none'}. See 'vlmkit plugins list'."
    )
