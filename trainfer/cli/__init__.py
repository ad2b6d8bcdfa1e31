"""The ``trainfer`` command. Each sub-command lives in its own module and is registered here."""

from __future__ import annotations

import logging

import click

from trainfer import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="trainfer")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.option("-v", "--verbose", is_flag=True, help="Log details (logger 'trainfer') at DEBUG level.")
def main(debug: bool, verbose: bool) -> None:
    """Train one form of a PyTorch model, deploy its exact inference form, serve it safely."""
    if verbose:
        logging.basicConfig(format="%(name)s %(levelname)s %(message)s")
        logging.getLogger("trainfer").setLevel(logging.DEBUG)


# Sub-commands register themselves on `main` when imported (one module per command).
from trainfer.cli.inspect import command as inspect_command  # noqa: E402

main.add_command(inspect_command)
from trainfer.cli.audit import command as audit_command  # noqa: E402

main.add_command(audit_command)
from trainfer.cli.demo import command as demo_command  # noqa: E402

main.add_command(demo_command)
from trainfer.cli.predict import command as predict_command  # noqa: E402

main.add_command(predict_command)
from trainfer.cli.export import command as export_command  # noqa: E402

main.add_command(export_command)
from trainfer.cli.bench import command as bench_command  # noqa: E402

main.add_command(bench_command)
from trainfer.cli.deploy import command as deploy_command  # noqa: E402

main.add_command(deploy_command)
from trainfer.cli.verify import command as verify_command  # noqa: E402

main.add_command(verify_command)
