"""The ``vlmkit`` command. Commands parse options, call one core function and print the result.

Nothing here imports torch at module level: ``vlmkit --help`` and ``vlmkit plugins list`` stay fast.
"""

from __future__ import annotations

import sys

import typer

from vlmkit import __version__
from vlmkit.cli import plugins as plugins_cmd
from vlmkit.core.errors import VlmkitError

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


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vlmkit {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the vlmkit version and exit."
    ),
) -> None:
    """vlmkit: prefix-conditioning image captioners from any encoder and decoder."""


def main() -> None:
    """Console-script entry point: one-line errors for vlmkit's own errors, no traceback."""
    try:
        app(standalone_mode=False)
    except VlmkitError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("Aborted.", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        typer.echo("Interrupted.", err=True)
        sys.exit(130)
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
