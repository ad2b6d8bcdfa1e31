"""The ``trainfer`` command. Each sub-command lives in its own module and is registered here."""

from __future__ import annotations

import logging
import warnings

import click

from trainfer._version import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="trainfer")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.option("-v", "--verbose", is_flag=True, help="Log details (logger 'trainfer') at DEBUG level.")
def main(debug: bool, verbose: bool) -> None:
    """Train one form of a PyTorch model, deploy its exact inference form, serve it safely."""
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
