"""``trainfer migrate OLD NEW``: rewrite a bundle of an older format (see :mod:`trainfer.serve.migrate`).

Exit codes: 0 migrated, 2 bad input (nothing to migrate, a factory not allowed, weights that do not fit).
"""

from __future__ import annotations

import click

from trainfer.cli.common import friendly_errors, trust_factory_option, trusted


@click.command("migrate")
@click.argument("source", metavar="OLD", type=click.Path(exists=True, file_okay=False))
@click.argument("target", metavar="NEW", type=click.Path())
@trust_factory_option
@friendly_errors
def command(source: str, target: str) -> None:
    """Write the format-1 deploy-form bundle OLD as a current bundle NEW (NEW may be OLD: replaced atomically).

    The fold is replayed once on OLD's training form; the stored weights must fit the graph it gives,
    and NEW is loaded back and compared before it is written.
    """
    from trainfer.atomic import check_target
    from trainfer.serve.migrate import migrate

    check_target(target, "NEW", directory=True)
    written = migrate(source, target, trust_factory=trusted())
    click.echo(f"migrated {source} -> {written} (it now records its architecture: no fold is replayed on load)")
