"""``trainfer demo``: the whole story on the embedded digits data, in a few minutes on 2 CPU cores.

The sequence step (digit strings, :mod:`trainfer.demo.sequences`) runs last, into ``OUT/sequences``;
``--no-sequences`` skips it, ``--sequences`` runs it alone.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import click

from trainfer.cli.common import COUNT, SEED, THREADS, IntRange, friendly_errors


@click.command("demo")
@click.option(
    "--out",
    default=Path("runs/demo"),
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output directory; replaced only after a successful run.",
)
@click.option("--epochs", default=15, show_default=True, type=COUNT, help="Training epochs.")
@click.option(
    "--seed", default=0, show_default=True, type=SEED, help="Seed of initialisation, shuffling, augmentation, Dropout."
)
@click.option("--subset", type=IntRange(min=1), help="Train on the first N training images only (quick runs).")
@click.option("--repeats", default=30, show_default=True, type=COUNT, help="Timed calls per latency figure.")
@click.option("--threads", default=1, show_default=True, type=THREADS, help="torch intra-op threads.")
@click.option(
    "--sequences",
    is_flag=True,
    help="Run only the sequence step: digit strings, a CRNN-CTC and an encoder-decoder (OUT/sequences).",
)
@click.option("--no-sequences", is_flag=True, help="Skip the sequence step (which the demo runs last by default).")
@friendly_errors
def command(
    out: Path,
    epochs: int,
    seed: int,
    subset: int | None,
    repeats: int,
    threads: int,
    sequences: bool,
    no_sequences: bool,
) -> None:
    """Train digits_net, deploy it, prove both forms agree, measure them, and write a report; then the
    sequence step (digit strings: a CRNN-CTC and an encoder-decoder, greedy vs beam) into OUT/sequences.

    Under `torchrun --nproc_per_node N -m trainfer demo` training runs on N processes (DDP);
    rank 0 does the rest.
    """
    from trainfer.atomic import check_target

    if sequences and no_sequences:
        raise click.UsageError("--sequences (only the sequence step) and --no-sequences exclude each other")
    check_target(out, "--out", directory=True)  # before any training: a file, a device, a FIFO are refused
    if sequences:
        import torch

        from trainfer.demo import sequences as sequence_demo

        torch.set_num_threads(threads)
        with _terminate_as_exit():
            report = sequence_demo.run(out / "sequences", epochs=min(epochs, sequence_demo.EPOCHS), seed=seed)
        for row in report["scores"]:
            click.echo(
                f"{row['model']:>16} {row['decoder']:>7}: sequence accuracy {row['sequence_accuracy']:.3f}, "
                f"CER {row['cer']:.3f}"
            )
        step = report["step_seconds"]
        click.echo(f"{step['wall']:.1f} s wall-clock, {step['cpu']:.1f} s of process CPU time")
        click.echo(f"wrote {out / 'sequences'} (report.md, sequences.png, scores.json, crnn_bundle, seq2seq_bundle)")
        return
    from trainfer.demo.pipeline import DemoOptions, run

    options = DemoOptions(
        out=out, epochs=epochs, seed=seed, subset=subset, repeats=repeats, threads=threads, sequences=not no_sequences
    )
    with _terminate_as_exit():
        run(options, echo=click.echo)


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """Let SIGTERM (``kill``, torchrun stopping its workers) unwind like Ctrl-C, so the demo's
    staging directory is removed and no half-written output remains."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
