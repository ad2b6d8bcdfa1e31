"""Helpers shared by the command-line commands: option bounds, shapes, --trust-factory, friendly errors.

Exit codes of every command: 0 success, 1 a negative verdict (e.g. not equivalent), 2 a user
error (one line on stderr), 3 an internal error (traceback, then a line saying it is a bug), 130
Ctrl-C (one line), 141 the reader of stdout left (``trainfer predict ... | head -1``: quietly, as a
program SIGPIPE ended).
"""

from __future__ import annotations

import functools
import math
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, cast

import click

from trainfer._version import __version__
from trainfer.errors import InputError, TrainferError, one_line
from trainfer.number_text import EXPECTED_FLOAT, EXPECTED_INTEGER, parse_float, parse_integer

_TRUST_KEY = "trainfer.trust_factory"
_HINT = "'--input-shape'"  # the option every command parses a shape from
#: The exit status when the reader of stdout left: 128 + SIGPIPE, a shell's status for a program SIGPIPE ended.
EXIT_READER_LEFT = 141
#: The exit status after Ctrl-C (SIGINT): the shell's 128 + 2, not click's "Aborted!" and 1 (a verdict's code).
INTERRUPTED = 130


#: The most threads a ``--threads`` option takes: as many as ``serve --workers`` (far more than any
#: machine has cores; 100000 crashed OpenBLAS's thread start-up).
MAX_THREADS = 1024
#: The most a count option takes (``--rounds``, ``--repeats``, ``--warmup``, ``--epochs``, ``--random-inputs``):
#: far more than any run needs, so that a typo (a few zeros too many) is refused, not run for days.
MAX_COUNT = 10_000
#: The most samples a batch-size option takes (``--batch-size``, ``--finetune-batch-size``): a batch of more
#: samples holds more than the 2**24 elements any input may have (``trainfer.serve.manifest.MAX_ELEMENTS``,
#: not imported here: it loads pydantic; a test keeps the two equal).
MAX_BATCH_SIZE = 2**24


class IntRange(click.IntRange):
    """click's ``IntRange`` that reads only ASCII digits (:func:`trainfer.number_text.parse_integer`): ``١`` and
    ``1_0`` are refused."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str):
            try:
                value = parse_integer(value)
            except ValueError:
                self.fail(f"{ascii(value)} is not {EXPECTED_INTEGER}", param, ctx)
        return super().convert(value, param, ctx)


#: ``--threads``: torch intra-op threads, 1 to :data:`MAX_THREADS`.
THREADS = IntRange(1, MAX_THREADS)
#: ``--seed``: 0 to 2**32 - 1 (numpy's legacy seeds). ``torch.manual_seed`` takes up to 2**64 - 1, but the
#: demo derives each epoch's seeds as ``(seed * 1_000_003 + epoch) * 1_009 + rank``, which must stay in it.
SEED = IntRange(0, 2**32 - 1)
#: A count of at least one (``--rounds``, ``--repeats``, ``--epochs``).
COUNT = IntRange(1, MAX_COUNT)
#: A count that may be zero (``--warmup``, ``--finetune-epochs``, ``--random-inputs``).
COUNT_OR_ZERO = IntRange(0, MAX_COUNT)
#: A batch size: 1 to :data:`MAX_BATCH_SIZE` samples.
BATCH_SIZE = IntRange(1, MAX_BATCH_SIZE)


def _ascii_float(value: Any, param: click.Parameter | None, ctx: click.Context | None, kind: click.ParamType) -> Any:
    """An option's ``value`` as :func:`trainfer.number_text.parse_float` reads text (other values, such as a
    default, as they are); text it refuses fails the option ``param`` in one line."""
    if not isinstance(value, str):
        return value
    try:
        return parse_float(value)
    except ValueError:
        kind.fail(f"{ascii(value)} is not {EXPECTED_FLOAT}", param, ctx)


class FiniteFloatRange(click.FloatRange):
    """click's ``FloatRange`` that reads only ASCII numbers (:func:`trainfer.number_text.parse_float`: ``٢`` and
    ``1_0`` are refused) and also refuses NaN and infinities: a NaN compares false with every number, so a NaN
    threshold would pass every range check and make a gate that can never fail. Every real-number option
    of the command line is one, or a :class:`Tolerance`."""

    name = "finite float range"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(_ascii_float(value, param, ctx, self), param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) -> ``(1, 3, 224, 224)``, of at most ``MAX_ELEMENTS`` elements
    (:func:`check_elements`)."""
    parts = text.replace("x", ",").split(",")
    if any(not part.strip() for part in parts):  # "1,,8,8" is a typo, not (1, 8, 8)
        raise click.BadParameter(
            f"expected comma-separated integers like 1,3,224,224; got {ascii(text)}", param_hint=_HINT
        )
    try:
        shape = tuple(parse_integer(p) for p in parts)
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated integers like 1,3,224,224; got {ascii(text)}", param_hint=_HINT
        ) from None
    if not shape or any(s <= 0 for s in shape):
        raise click.BadParameter(f"expected positive sizes like 1,3,224,224; got {ascii(text)}", param_hint=_HINT)
    check_elements(shape, ascii(text), _HINT)
    return shape


def check_elements(shape: tuple[int, ...], given: str, param_hint: str) -> None:
    """Refuse an input ``shape`` of more than ``MAX_ELEMENTS`` elements, naming the option and the value ``given``.

    The limit is the manifest's (:data:`trainfer.serve.manifest.MAX_ELEMENTS`, 2**24): a larger
    example input could not be recorded in a bundle, and would be allocated before anything is checked.
    Raises ``click.BadParameter`` (one line, exit 2).
    """
    from trainfer.serve.manifest import MAX_ELEMENTS

    if math.prod(shape) > MAX_ELEMENTS:
        raise click.BadParameter(
            f"expected at most {MAX_ELEMENTS} elements in all (trainfer.serve.manifest.MAX_ELEMENTS); "
            f"got {given}: {math.prod(shape)} elements",
            param_hint=param_hint,
        )


class Tolerance(click.ParamType):
    """A tolerance option: a finite number > 0, or >= 0 with ``zero=True``.

    The rule is :func:`trainfer.validate.check_tolerance`'s, which the Python API applies too.
    """

    name = "tolerance"

    def __init__(self, zero: bool = False):
        self.zero = zero

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        from trainfer.validate import check_tolerance

        number = _ascii_float(value, param, ctx, self)
        try:
            return cast(float, check_tolerance(self.name, float(number), zero=self.zero))  # never None: a float
        except (TypeError, ValueError):  # not a number, or refused (InputError is a ValueError)
            self.fail(f"expected a finite number {'>=' if self.zero else '>'} 0; got {value!r}", param, ctx)


def check_output_apart(output: str | Path, *inputs: str | Path, option: str = "--output") -> None:
    """Refuse an ``output`` that would overwrite one of ``inputs``: the same path, a path inside it, or one holding it.

    Paths are compared resolved (symlinks followed, also for paths that do not exist yet), so
    ``-o ./b``, a link to ``b`` or ``b/sub`` are all ``b``. Every command that writes a file or a
    bundle from input paths calls this before reading anything: a refused command leaves its inputs
    untouched. Raises :class:`~trainfer.errors.InputError` (one line, exit 2).
    """
    target = Path(output).resolve()
    for source in inputs:
        resolved = Path(source).resolve()
        if target == resolved or target.is_relative_to(resolved) or resolved.is_relative_to(target):
            raise InputError(
                f"{option} {str(output)!r} would overwrite the input {str(source)!r}: write to another path"
            )


def trust_factory_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--trust-factory`` to a command that loads bundles (read back with :func:`trusted`)."""

    def remember(context: click.Context, _: click.Parameter, value: bool) -> bool:
        context.meta[_TRUST_KEY] = value
        return value

    return click.option(
        "--trust-factory",
        is_flag=True,
        expose_value=False,
        callback=remember,
        help="Let a bundle name any factory: imports and runs code its author chose. Only for bundles you trust.",
    )(command)


#: The regression limits' defaults, :class:`trainfer.serve.gate.AccuracyGate`'s (not imported here: it loads
#: torch; a test checks they agree).
MAX_RMS_ERROR, MAX_MAE_INCREASE = 0.1, 0.1


def gate_options(rel_error: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add the accuracy gate's thresholds, ``--min-agreement`` and ``--max-accuracy-drop`` (a fraction),
    ``--max-rms-error`` and ``--max-mae-increase`` (regression outputs), and with ``rel_error``
    ``--max-rel-error``, with the defaults of every command that gates a reduced form (quantize, prune,
    compile)."""

    def add(command: Callable[..., Any]) -> Callable[..., Any]:
        command = _drop_needs_labels(command)
        if rel_error:
            command = click.option(
                "--max-rel-error", type=FiniteFloatRange(min=0), default=None, help="Limit on max rel output error."
            )(command)
        command = click.option(
            "--max-mae-increase", type=FiniteFloatRange(min=0), default=MAX_MAE_INCREASE, show_default=True,
            help="Regression with --labels (real targets): largest MAE increase, a fraction of the reference's.",
        )(command)  # fmt: skip
        command = click.option(
            "--max-rms-error", type=FiniteFloatRange(min=0), default=MAX_RMS_ERROR, show_default=True,
            help="Regression: largest RMS output error, in standard deviations of the reference outputs.",
        )(command)  # fmt: skip
        command = click.option(
            "--max-accuracy-drop", type=FiniteFloatRange(0, 1), default=0.005, show_default=True, help="Fraction."
        )(command)
        return click.option("--min-agreement", type=FiniteFloatRange(0, 1), default=0.99, show_default=True)(command)

    return add


def _drop_needs_labels(command: Callable[..., Any]) -> Callable[..., Any]:
    """Warn when ``--max-accuracy-drop`` is given without ``--labels``: without labels no accuracy is
    measured, so the drop goes unchecked (its default alone goes unchecked without a word)."""

    @functools.wraps(command)
    def checked(*args: Any, **kwargs: Any) -> Any:
        context = click.get_current_context()
        given = context.get_parameter_source("max_accuracy_drop") is not click.core.ParameterSource.DEFAULT
        if given and kwargs.get("labels") is None:
            warnings.warn(
                "--max-accuracy-drop is not checked without --labels: no accuracy is measured "
                "(--min-agreement still applies)",
                UserWarning,
                stacklevel=2,
            )
        return command(*args, **kwargs)

    return checked


def trusted() -> bool:
    """Whether the running command was given ``--trust-factory``."""
    context = click.get_current_context(silent=True)
    return bool(context and context.meta.get(_TRUST_KEY, False))


def friendly_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """User errors become a one-line message and exit code 2; bugs keep their traceback (exit 3).

    User errors are trainfer's own exceptions (:class:`~trainfer.errors.TrainferError`) and
    ``OSError`` (a path the user gave that is missing, unreadable or on a full disk). Anything else
    is a bug in trainfer (or in the user's model code): its traceback is printed, then a line
    saying so. ``--debug`` re-raises every error with its traceback. When the reader of stdout
    leaves (``| head -1``), the command ends quietly with :data:`EXIT_READER_LEFT`; Ctrl-C ends it
    with one line and :data:`INTERRUPTED` (every write is atomic: an interrupted one leaves nothing).
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            result = command(*args, **kwargs)
            sys.stdout.flush()  # a reader that left is found here, not in Python's last flush at exit
            return result
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except BrokenPipeError:
            _exit_for_a_reader_that_left()
        except KeyboardInterrupt:
            if debug:
                raise
            click.echo("interrupted (Ctrl-C)", err=True)
            sys.exit(INTERRUPTED)
        except (TrainferError, OSError) as error:
            if debug:
                raise
            click.echo(f"error: {one_line(error)}", err=True)
            sys.exit(2)
        except Exception:
            if debug:
                raise
            traceback.print_exc()
            click.echo(f"internal error in trainfer {__version__} (a bug): please report it, traceback above", err=True)
            sys.exit(3)

    return wrapper


def _exit_for_a_reader_that_left() -> NoReturn:
    """End quietly with :data:`EXIT_READER_LEFT`: stdout's reader is gone, so there is no one to tell.

    stdout is pointed at ``/dev/null`` first, so that Python's flush at exit of what is still
    buffered does not fail again (the recipe of the "Note on SIGPIPE" in Python's ``signal`` docs).
    """
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(EXIT_READER_LEFT)
