"""`hwsi <command>`: the one entry point. Each stage package registers its commands in ``<stage>/commands.py``.

Command modules keep heavy imports (torch, transformers) inside the command functions so `hwsi --help` is fast.
"""

from __future__ import annotations

import importlib
import sys

import typer
from typer._click.exceptions import NoArgsIsHelpError

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
    for stage in STAGES:
        module = importlib.import_module(f"hwsi.{stage}.commands")
        module.register(app)


_register()


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _usage_line(exc: typer.TyperException) -> str:
    """One line for a typer/click usage error: the command it concerns and what is wrong."""
    ctx = getattr(exc, "ctx", None)
    where = getattr(ctx, "command_path", "") or "hwsi"
    return f"error: {where}: {_one_line(exc.format_message())} (see `{where} --help`)"


def main(argv: list[str] | None = None) -> int:
    """Run the CLI. Every way a command can be refused ends here, as ONE line on stderr and an exit code:

    * bad input (an :class:`HwsiError`: a file, option or config value that cannot be used): ``error: ...``, 2;
    * a usage error (missing option, a value of the wrong type, unknown command or option; typer >= 0.29 raises
      these from its own copy of click, ``typer.TyperException``, not ``click.ClickException``):
      ``error: hwsi CMD: ...``, 2 (``hwsi`` without arguments prints the help, 2);
    * an OS error on a named file (permission denied, not a directory, disk full): ``error: FILE: reason``, 2;
    * Ctrl-C: ``aborted``, 130.

    A command's own exit code (e.g. 1 when some slides of a batch failed) is returned as is. Anything else is a
    bug in hwsi and keeps its traceback.
    """
    try:
        rv = app(args=argv, prog_name="hwsi", standalone_mode=False)
        if isinstance(rv, int) and not isinstance(rv, bool):  # click returns typer.Exit's code here
            return rv
    except HwsiError as exc:
        typer.secho(f"error: {_one_line(str(exc))}", err=True, fg=typer.colors.RED)
        return 2
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        return 130
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    except typer.TyperException as exc:
        if isinstance(exc, NoArgsIsHelpError):
            exc.show()
        else:
            typer.secho(_usage_line(exc), err=True, fg=typer.colors.RED)
        return int(exc.exit_code)
    except OSError as exc:
        if exc.filename is None:
            raise
        typer.secho(f"error: {exc.filename}: {exc.strerror or exc}", err=True, fg=typer.colors.RED)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
