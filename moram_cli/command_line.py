"""How the `moram` command line presents itself around the commands: its --help and its usage errors.

Typer's defaults suit an interactive tool, not one run from CI scripts: a
usage error is a boxed block of five lines, and --help shows `--json <bool>`
and `{store}`. Here a usage error is one line on stderr, as every other
moram error is, and --help reads as Unix help does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import typer
# Typer's own copy of click (typer 0.29 is pinned in pyproject.toml): its usage errors are of these classes.
from typer._click.exceptions import NoArgsIsHelpError, UsageError
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from moram_cli.errors import report_failure


def fail(message: str, code: int, follows: bool = False) -> NoReturn:
    """Print the one-line message (under `--launch`, the launcher prints one for all processes: `follows` marks a
    failure that only follows another process's) and exit with `code`."""
    if not report_failure(message, code, follows):
        typer.echo(message, err=True)
    raise typer.Exit(code) from None


@contextmanager
def one_line_usage_errors() -> Iterator[None]:
    """A usage error inside the block ends in one line on stderr naming the command's --help, and exit code 2."""
    try:
        yield
    except NoArgsIsHelpError:
        raise  # `moram` alone: the help is the answer
    except UsageError as err:
        where = err.ctx.command_path if err.ctx is not None else "moram"
        message = " ".join(err.format_message().split()).rstrip(".")
        fail(f"error: {message[:1].lower()}{message[1:]}; see '{where} --help'", 2)


class MoramGroup(TyperGroup):
    """The `moram` group: its own options and the chosen command are parsed inside `one_line_usage_errors`."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        with one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: Any) -> Any:
        with one_line_usage_errors():
            return super().invoke(ctx)

    def get_params(self, ctx: Any) -> list:
        return plain_params(super().get_params(ctx))


class MoramCommand(TyperCommand):
    """A `moram` command whose help shows flags bare and arguments in capitals, as `moram eval [OPTIONS] STORE`."""

    def get_params(self, ctx: Any) -> list:
        return plain_params(super().get_params(ctx))

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            pieces += [argument_usage(param)] if isinstance(param, TyperArgument) else param.get_usage_pieces(ctx)
        return pieces


def plain_params(params: list) -> list:
    """`params`, named for help as Unix tools do: a flag takes no value, so shows none; an argument is a capitalised name."""
    for param in params:
        if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""  # Typer's help prints the metavar in place of the type, `<bool>`
        elif isinstance(param, TyperArgument) and param.metavar is None:
            param.metavar = param.name.upper() + ("..." if param.nargs != 1 else "")
    return params


def argument_usage(argument: TyperArgument) -> str:
    """`STORE`, `SOURCES...` or `[STORE]` (optional) in the usage line; Typer writes a required one as `{STORE}`."""
    return argument.metavar if argument.required else f"[{argument.metavar}]"
