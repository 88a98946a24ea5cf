"""`hwsi <command>`: the one entry point. Each stage package registers its commands in ``<stage>/commands.py``.

Command modules keep heavy imports (torch, transformers) inside the command functions so `hwsi --help` is fast.
"""

from __future__ import annotations

import sys

import typer

from hwsi import __version__
from hwsi.errors import HwsiError

STAGES = ("slide", "synth", "cells", "features", "train", "eval", "serve", "demo")

app = typer.Typer(
    name="hwsi",
    help="MLLM-HWSI: hierarchical multimodal LLM for pathology whole-slide images "
    "(cells as words, patches as phrases, regions as sentences, the slide as a paragraph).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"hwsi {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """MLLM-HWSI toolkit."""


def _register() -> None:
    import importlib

    for stage in STAGES:
        module = importlib.import_module(f"hwsi.{stage}.commands")
        module.register(app)


_register()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; bad input (an :class:`HwsiError`) prints one clear line and exits with code 2."""
    try:
        rv = app(args=argv, standalone_mode=False)
        if isinstance(rv, int) and not isinstance(rv, bool):  # click returns typer.Exit's code here
            return rv
    except HwsiError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        return 2
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            return exc.exit_code
        if isinstance(exc, click.exceptions.Abort):
            typer.echo("aborted", err=True)
            return 130
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
