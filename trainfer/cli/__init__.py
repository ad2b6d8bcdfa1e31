"""The ``trainfer`` command. Each sub-command lives in its own module and is registered here."""

from __future__ import annotations

import logging
import os
import warnings
from typing import IO, Any

import click

from trainfer._version import __version__

#: click >= 8.2 raises this for a bare command whose help is its answer (click 8.1 prints the help itself).
_HELP: tuple[type[Exception], ...] = tuple(
    error for error in [getattr(click.exceptions, "NoArgsIsHelpError", None)] if error is not None
)


class _OneLineError(click.ClickException):
    """A click error (bad option value, missing argument, unknown option) shown as one ``error:`` line."""

    def __init__(self, error: click.ClickException):
        super().__init__(" ".join(error.format_message().split()))
        self.__dict__["exit_code"] = error.exit_code  # click's own code (2 for usage errors); a ClassVar to mypy

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {self.message}", file=file, err=file is None)


class _Group(click.Group):
    """The ``trainfer`` group: click's errors are one ``error:`` line on stderr (``--debug``: click's form)."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except _HELP:
            raise
        except click.ClickException as error:  # the group's own options, before --debug is known
            raise _OneLineError(error) from error

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.ClickException as error:
            if ctx.params.get("debug") or isinstance(error, (_OneLineError, *_HELP)):
                raise
            raise _OneLineError(error) from error


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="trainfer")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.option("-v", "--verbose", is_flag=True, help="Log details (logger 'trainfer') at DEBUG level.")
def main(debug: bool, verbose: bool) -> None:
    """Train one form of a PyTorch model, deploy its exact inference form, serve it safely."""
    # Python 3.11's -P for every interpreter started from here (multiprocessing's workers, torch inductor's
    # compile workers: `python -c ...` puts the current directory first on sys.path, so a module left in
    # a downloaded bundle's folder would run in them). An explicit setting of yours is kept.
    os.environ.setdefault("PYTHONSAFEPATH", "1")
    if not debug:  # a warning is one line, as errors are (--debug keeps Python's form with the source line)
        warnings.formatwarning = one_line_warning
    if verbose:
        logging.basicConfig(format="%(name)s %(levelname)s %(message)s")
        logging.getLogger("trainfer").setLevel(logging.DEBUG)


def one_line_warning(message: Warning | str, category: type[Warning], *_: object, **__: object) -> str:
    """``warning: <message>`` on one line (the format of warnings the command line prints)."""
    text = " ".join(str(message).split())
    return f"warning: {text}\n"


# One module per sub-command, each defining `command`; imported after `main` exists.
from trainfer.cli import (  # noqa: E402
    audit,
    bench,
    compile,
    demo,
    deploy,
    export,
    inspect,
    migrate,
    predict,
    prune,
    quantize,
    serve,
    verify,
)

for _module in (inspect, audit, demo, predict, export, bench, deploy, verify, quantize, prune, compile, migrate, serve):
    main.add_command(_module.command)
