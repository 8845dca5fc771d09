"""The ``vlmkit`` command. Each command's flags are generated from its configuration
(``vlmkit.cli.configs``); the command runs its job and prints the result.

Nothing here imports torch at module level: ``vlmkit --help`` and ``vlmkit plugins list`` stay fast.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings

import typer

from vlmkit import __version__
from vlmkit.cli import caption as caption_cmd
from vlmkit.cli import demo as demo_cmd
from vlmkit.cli import eval as eval_cmd
from vlmkit.cli import export as export_cmd
from vlmkit.cli import inspect as inspect_cmd
from vlmkit.cli import plugins as plugins_cmd
from vlmkit.cli import train as train_cmd
from vlmkit.core.errors import VlmkitError, VlmkitWarning, printable

app = typer.Typer(
    name="vlmkit",
    help=(
        "Turn a pretrained vision encoder and a decoder-only language model into an image "
        "captioner: a frozen encoder's features become a prefix for the LM, which is adapted with LoRA."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(plugins_cmd.app, name="plugins")
app.command("train")(train_cmd.train_command)
app.command("eval")(eval_cmd.eval_command)
app.command("export")(export_cmd.export_command)
app.command("caption")(caption_cmd.caption_command)
app.command("demo")(demo_cmd.demo_command)
app.command("inspect")(inspect_cmd.inspect_command)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vlmkit {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the vlmkit version and exit."
    ),
    debug: bool = typer.Option(
        False,
        "--debug",
        help="Show full tracebacks: of errors, and of plugins that failed to load (or set VLMKIT_DEBUG=1).",
    ),
) -> None:
    """vlmkit: prefix-conditioning image captioners from any encoder and decoder."""
    if debug:
        os.environ["VLMKIT_DEBUG"] = "1"  # read where the errors and plugin warnings are printed


def debugging() -> bool:
    """``--debug`` or ``VLMKIT_DEBUG=1``: tracebacks instead of one-line errors alone."""
    return os.environ.get("VLMKIT_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def main() -> None:
    """Console-script entry point: one-line errors for vlmkit's own errors, no traceback.

    Typer runs in standalone mode, so it prints usage errors and help and exits with click's
    codes (typer vendors its own click: catching ``click.ClickException`` here would miss them).
    """
    _plugin_warnings_on_one_line()
    _log_to_stderr()
    try:
        app(prog_name="vlmkit")
    except VlmkitError as exc:
        if debugging():
            traceback.print_exc()
        typer.secho(f"error: {printable(str(exc))}", fg="red", err=True)
        sys.exit(1)


def _log_to_stderr() -> None:
    """vlmkit's own info messages (checkpoint conversions, cache hits, resumes) go to stderr."""
    import logging

    logger = logging.getLogger("vlmkit")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("vlmkit: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _plugin_warnings_on_one_line() -> None:
    """Print vlmkit's warnings (plugins, data, cache) as ``warning: ...`` on stderr, without
    Python's source-line echo."""
    default_show = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, VlmkitWarning):
            typer.secho(f"warning: {printable(str(message))}", fg="yellow", err=True)
            for trace in getattr(message, "tracebacks", ()) if debugging() else ():
                typer.echo(trace.rstrip(), err=True)
        elif category.__name__ == "DecompressionBombWarning":
            pass  # Pillow's; the image loader refuses such an image with its own error line
        else:
            default_show(message, category, filename, lineno, file, line)

    warnings.showwarning = show


if __name__ == "__main__":
    main()
