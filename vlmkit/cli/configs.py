"""Commands generated from the commands' configurations: one flag per setting, written once.

A setting's flag is its key with dashes: ``lr_lora`` is ``--lr-lora``, ``model.lora.r`` is
``--lora-r`` (the sections named in ``flatten`` add no prefix), a ``bool`` is ``--x/--no-x``, a
list takes its flag once per item (``datasets``: ``--dataset``), a mapping takes ``key=value,...``.
Its help, type, choices, help panel (``group``) and short flag come from the field
(``vlmkit.core.config.setting``); the default is shown from the field too. A flag not given is
``None``, so a setting given nowhere keeps the configuration's own default (or a config file's).

A command's handler takes the settings (``{dotted key: value}``) and its own printing options.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from vlmkit.core.config import nested, parse_mapping, validated


@dataclass
class Flag:
    key: str  # the dotted key in the configuration: model.lora.r
    name: str  # the handler's parameter: lora_r
    annotation: Any
    info: Any  # typer.Option(...) or typer.Argument(...)
    mapping: bool = False  # key=value,... text, parsed into a dict


def flags(
    config: type[BaseModel], *, flatten: tuple[str, ...] = (), every_flag_optional: bool = False
) -> list[Flag]:
    """A ``Flag`` per setting of ``config``; nested sections are walked (``projection.type``:
    ``--projection-type``), those in ``flatten`` without a prefix. ``every_flag_optional``: no flag
    is required on the command line (a config file or a recipe may give it)."""
    out = list(_walk(config, "", "", None, flatten, every_flag_optional))
    names = [f.name for f in out]
    duplicated = {n for n in names if names.count(n) > 1}
    if duplicated:  # a config that would need two spellings: rename one of its settings
        raise TypeError(f"{config.__name__}: settings share a flag: {duplicated}")
    return out


def _walk(model, key_prefix, flag_prefix, group, flatten, optional):
    for name, field in model.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        key, words = f"{key_prefix}{name}", f"{flag_prefix}{name}"
        annotation = _without_none(field.annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            prefix = "" if key in flatten else f"{words}_"
            yield from _walk(annotation, f"{key}.", prefix, extra.get("group", group), flatten, optional)
            continue
        default, metavar = field.get_default(call_default_factory=True), None
        shown = "" if default in (None, PydanticUndefined, [], {}, "") else f" (default: {_show(default)})"
        help_text = (field.description or "") + shown
        is_list = typing.get_origin(annotation) is list
        mapping = typing.get_origin(annotation) is dict
        if is_list:  # one flag per item: --dataset A --dataset B
            words = words.removesuffix("s")
            item = typing.get_args(annotation)[0]
            annotation = list[item if item in (str, int, float, Path) else str]
            metavar = f"<{annotation.__args__[0].__name__.lower()}>"
        elif mapping:
            annotation, metavar = str, "<key=value,...>"
        required = field.is_required() and not optional
        panel = extra.get("group", group)
        if extra.get("argument"):
            metavar = words.upper()
            info = typer.Argument(
                ... if required else None, help=help_text, metavar=metavar, show_default=False
            )
        else:
            decls = [f"--{words.replace('_', '-')}"]
            if annotation is bool:
                decls = [f"{decls[0]}/--no-{decls[0][2:]}"]
            decls += [extra["short"]] if extra.get("short") else []
            info = typer.Option(
                ... if required else None,
                *decls,
                help=help_text,
                metavar=metavar,
                rich_help_panel=panel,
                show_default=False,
            )
        yield Flag(key, words, annotation, info, mapping)


def _without_none(annotation):
    """``X | None`` -> ``X``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _show(value) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else str(value)


def command(
    config: type[BaseModel],
    handler: Callable[..., None],
    *,
    flatten: tuple[str, ...] = (),
    every_flag_optional: bool = False,
    renamed: dict[str, str] | None = None,
) -> Callable[..., None]:
    """A Typer command: ``config``'s flags, then the handler's own parameters (after its first,
    which receives the settings given, ``{dotted key: value}``). ``renamed``: old flag -> new flag,
    refused with a one-line hint."""
    generated = flags(config, flatten=flatten, every_flag_optional=every_flag_optional)
    hints = typing.get_type_hints(handler)
    own = [
        p.replace(annotation=hints.get(p.name, p.annotation))
        for p in inspect.signature(handler).parameters.values()
    ][1:]
    hidden = [
        inspect.Parameter(
            f"renamed_{i}",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(None, old, hidden=True, callback=_refuse(old, new)),
            annotation=str,
        )
        for i, (old, new) in enumerate((renamed or {}).items())
    ]

    def run(**values: Any) -> None:
        settings = {}
        for flag in generated:
            value = values.pop(flag.name)
            if value is None or value == []:
                continue
            settings[flag.key] = (
                parse_mapping(value, f"--{flag.name.replace('_', '-')}") if flag.mapping else value
            )
        for param in hidden:
            values.pop(param.name)
        handler(settings, **values)

    parameters = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.info, annotation=f.annotation)
        for f in generated
    ]
    run.__signature__ = inspect.Signature(
        [*parameters, *(p.replace(kind=p.KEYWORD_ONLY) for p in own), *hidden]
    )
    run.__doc__ = handler.__doc__
    run.__name__ = handler.__name__
    return run


def _refuse(old: str, new: str):
    def refuse(value: str | None) -> None:
        if value is not None:
            raise typer.BadParameter(f"renamed: use {new}", param_hint=old)

    return refuse


def configured(config: type[BaseModel], settings: dict[str, Any], source: str) -> Any:
    """The settings a command was given (``{dotted key: value}``) as a validated ``config``;
    ``ConfigError`` naming ``source`` (the command) and the setting otherwise."""
    return validated(config, nested(settings), source)
