"""Checks at load that what a bundle serves is what its manifest says, on a few deterministic inputs.

A bundle's files are untrusted, and digests recorded beside them prove nothing: whoever replaces a
file recomputes its sha256. So before a :class:`~trainfer.Predictor` serves a bundle, the forms it
would serve are run on fixed inputs and compared with what the bundle declares; a contradiction
is a :class:`~trainfer.errors.BundleError`:

* **declared heads** (:func:`check_declared_heads`): on :data:`KIND_PROBES` seeded
  standard-normal inputs (:func:`probe_inputs`, the scale of normalised inputs; never read from
  the bundle), every recorded head's outputs must be what its ``output_kind`` says
  (:func:`trainfer.serve.outputs.check_output_kind`: probabilities in [0, 1] with rows summing to
  1, log-probabilities <= 0 with ``exp`` rows summing to 1, logits that are not already such
  rows), within the tolerance of the output dtype (at least 1e-3), and a classification head's
  labels must name exactly the classes its outputs hold; and every head's outputs must be finite
  (``logits`` and ``log_probabilities`` may hold ``-inf``, a probability of 0: a masked class):
  weights that overflow (a parameter of 1e30) pass the check of finite weights, then every
  request would fail;
* **the int8 form** (:func:`check_int8_form`): ``quantized.onnx`` must agree with the bundle's own
  float weights on the probe inputs ``trainfer quantize`` stored beside it (``probes.safetensors``,
  up to :data:`MAX_PROBES` samples of the validation data on which both forms agreed: random
  inputs are no test of an int8 form, whose activation ranges are calibrated on real data, and a
  genuine one agrees with its float form on barely half of them). Required, whatever
  ``quantization.json`` records (a forged record cannot loosen it): class agreement of at least
  :data:`MIN_INT8_AGREEMENT`, or, for outputs that are not classes (one column, regression), a max
  error relative to the float output scale of at most :data:`MAX_INT8_REL_ERROR`.

What the probes cannot rule out: an int8 file built to agree with the float form on exactly the
stored probes and differ elsewhere; the probes then come from the same author as the file.

A recorded runtime (``runtime.json``) needs no check here: :func:`trainfer.serve.runtime.compile`
builds it from the float weights and verifies it against float64 on every load, with tolerances
from :data:`trainfer.numerics.TOLERANCE`, never from the record.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from trainfer.errors import BundleError
from trainfer.numerics import tolerance_for
from trainfer.readfile import open_regular, present
from trainfer.serve.gate import AccuracyGate, GateOutput, gate_report, logits_over
from trainfer.serve.outputs import Head, check_output_kind, select_output

PROBE_SEED = 0
KIND_PROBES = 8
PROBES_FILE = "probes.safetensors"
#: At most this many int8 probe samples, and at most PROBE_BYTES of them (fewer for large inputs).
MAX_PROBES = 32
PROBE_BYTES = 8 * 2**20
#: The least class agreement of an int8 form with its float form on the stored probes.
MIN_INT8_AGREEMENT = 0.9
#: The largest error of a one-column int8 output relative to the float output scale on the probes.
MAX_INT8_REL_ERROR = 0.25

__all__ = [
    "KIND_PROBES",
    "MAX_INT8_REL_ERROR",
    "MAX_PROBES",
    "MIN_INT8_AGREEMENT",
    "PROBES_FILE",
    "PROBE_SEED",
    "check_declared_heads",
    "check_int8_form",
    "probe_inputs",
    "read_probes",
    "select_probes",
]


def probe_inputs(sample_shape: Sequence[int], dtype: torch.dtype = torch.float32, samples: int = KIND_PROBES) -> Tensor:
    """``samples`` standard-normal inputs of ``sample_shape`` (no batch dimension), seeded by :data:`PROBE_SEED`."""
    generator = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randn(samples, *sample_shape, generator=generator, dtype=torch.float64).to(dtype)


def check_declared_heads(
    forward: Callable[[Tensor], Any],
    heads: Sequence[Head],
    probes: Tensor,
    source: str,
    kinds: bool = True,
    refusing: str = "refusing to serve it",
) -> None:
    """Refuse heads whose outputs on ``probes`` are not finite, or contradict their labels or (``kinds``) their
    declared output kind (see the module doc): a :class:`BundleError` of one line ending with ``refusing``
    (what the caller refuses: the loader serving the bundle, a command writing it)."""
    if not heads:
        return
    try:
        output = forward(probes)
    except Exception as error:  # the model's own failure on inputs of the shape its manifest declares
        failure = f"{type(error).__name__}: {error}"
        raise BundleError(f"{source}: the model fails on {len(probes)} probe inputs of its shape: {failure}") from error
    for head in heads:
        values = select_output(output, head.select)
        problem = _finite_problem(head, values) or (_kind_problem(head, values) if kinds else None)
        problem = problem or _labels_problem(head, values)
        if problem:
            name = f"head {head.name!r}: " if head.name is not None else ""
            raise BundleError(f"{source}: {name}{problem} on {len(probes)} probe inputs: {refusing}")


def _finite_problem(head: Head, values: Tensor) -> str | None:
    """Outputs holding NaN or an infinity, said with where (``-inf`` is the probability 0 of a head whose scores
    are logarithms: ``logits`` or ``log_probabilities``)."""
    if not values.is_floating_point():
        return None
    bad = ~torch.isfinite(values)
    if _declares_kind(head) and head.kind.kind != "probabilities":  # type: ignore[union-attr]
        bad &= ~torch.isneginf(values)
    if not bool(bad.any()):
        return None
    output = "the output" if head.select is None else f"output {head.select!r}"
    first = tuple(int(i) for i in bad.nonzero()[0])
    return (
        f"{output} holds {int(bad.sum())} non-finite value(s) (NaN or inf; the first at index {first}: "
        f"{float(values[first])}): expected finite outputs (weights that overflow?)"
    )


def _declares_kind(head: Head) -> bool:
    return head.kind is not None and head.task != "regression"


def _declares_classes(head: Head) -> bool:
    return head.task == "classification" and head.labels is not None


def _kind_problem(head: Head, values: Tensor) -> str | None:
    if not _declares_kind(head):
        return None
    tolerance = max(1e-3, tolerance_for(values.dtype)) if values.is_floating_point() else 1e-3
    return check_output_kind(values, head.kind.kind, head.task, tolerance)  # type: ignore[union-attr]


def _labels_problem(head: Head, values: Tensor) -> str | None:
    """A classification head's label count against the classes of its ``(N, classes)`` outputs."""
    if not _declares_classes(head) or values.dim() != 2:
        return None
    classes, count = values.shape[1], len(head.labels)  # type: ignore[arg-type]
    return None if count == classes else f"{count} labels given, but the model outputs {classes} classes"


# --------------------------------------------------------------------------- int8 forms
def select_probes(inputs: Tensor, reference: Tensor, candidate: Tensor) -> Tensor:
    """The int8 probes to store: the first samples of ``inputs`` on which both forms' outputs agree.

    ``reference``/``candidate``: the float and int8 outputs over ``inputs`` (the gate's), 2-D.
    Agreement is the same class, or for one-column outputs an error within
    :data:`MAX_INT8_REL_ERROR` of the float output scale *of the chosen samples* (so that
    :func:`check_int8_form` on them passes where they were chosen); at most :data:`MAX_PROBES`
    samples and :data:`PROBE_BYTES` bytes; none when no sample agrees.
    """
    count = max(1, min(MAX_PROBES, PROBE_BYTES // max(inputs[0].numel() * 4, 1)))
    errors = (candidate - reference).abs().flatten(1).amax(1)
    if _classes(reference):
        chosen = (reference.argmax(1) == candidate.argmax(1)).nonzero().flatten()[:count]
    else:
        chosen = torch.arange(min(len(inputs), count))
        while len(chosen):  # shrinks until every chosen error is within the chosen samples' scale
            scale = float(reference[chosen].abs().max()) or 1.0
            within = chosen[errors[chosen] <= MAX_INT8_REL_ERROR * scale]
            if len(within) == len(chosen):
                break
            chosen = within
    return inputs[chosen].detach().to("cpu", torch.float32).contiguous()


def read_probes(directory: Path, entry: Any, sample_shape: Sequence[int]) -> Tensor:
    """The probe inputs a ``quantization.json`` entry names, validated: file, sha256, shape, finite values."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    record = entry.get("probes") if isinstance(entry, Mapping) else None
    if not isinstance(record, Mapping) or record.get("file") != PROBES_FILE:
        raise BundleError(
            f"{str(directory)!r}: quantization.json names no probe inputs ({PROBES_FILE!r}) to check the int8 form "
            "against the float weights (written by an older trainfer?): run trainfer quantize again"
        )
    file = directory / PROBES_FILE
    if not present(file) or file.stat().st_size > 2 * PROBE_BYTES:
        raise BundleError(f"{str(file)!r} is missing or larger than {2 * PROBE_BYTES} bytes")
    with open_regular(file) as handle:
        data = handle.read(2 * PROBE_BYTES + 1)
    if hashlib.sha256(data).hexdigest() != record.get("sha256"):
        raise BundleError(f"{str(file)!r} does not match the sha256 quantization.json records")
    try:
        tensors = load(data)  # the bytes checked, not the file opened again
    except (SafetensorError, OSError, ValueError) as error:
        raise BundleError(f"cannot read {str(file)!r}: {error}") from None
    probes = tensors.get("inputs")
    expected = tuple(sample_shape)
    if probes is not None and probes.dim() > 0 and len(probes) == 0:
        raise BundleError(
            f"{str(file)!r} holds no probe inputs: the int8 form agreed with the float form on none of its "
            "validation inputs when it was made, so it cannot be checked and is not served; serve the float form "
            "(CLI: --runtime torch; Python: runtime='torch'), or quantize again with representative calibration data"
        )
    if (
        probes is None
        or probes.dtype != torch.float32
        or tuple(probes.shape[1:]) != expected
        or not 1 <= len(probes) <= MAX_PROBES
        or not bool(torch.isfinite(probes).all())
    ):
        found = None if probes is None else f"{probes.dtype} {tuple(probes.shape)}"
        raise BundleError(
            f"{str(file)!r}: expected 'inputs', 1 to {MAX_PROBES} finite float32 samples of shape {expected}; "
            f"found {found}"
        )
    return probes


def check_int8_form(int8: Callable[[Tensor], Any], reference: nn.Module, probes: Tensor, source: str) -> None:
    """Refuse an int8 form that does not agree with the float ``reference`` on ``probes`` (see the module doc)."""
    try:
        with torch.inference_mode():
            expected = logits_over(reference, probes)
            got = logits_over(int8, probes)
    except Exception as error:  # the int8 file is untrusted: ONNX Runtime/OpenVINO raise their own types
        raise BundleError(
            f"{source}: the int8 form fails on its probe inputs: {type(error).__name__}: {error}"
        ) from None
    if got.shape != expected.shape:
        raise BundleError(
            f"{source}: the int8 form returns outputs of shape {tuple(got.shape)}, "
            f"its float form {tuple(expected.shape)}"
        )
    classes = _classes(expected)
    gate = AccuracyGate(
        min_agreement=MIN_INT8_AGREEMENT if classes else None,
        max_accuracy_drop=None,
        max_rel_error=None if classes else MAX_INT8_REL_ERROR,
        max_rms_error=None,
    )
    report = gate_report(expected, got, None, gate, GateOutput("classification" if classes else "regression"))
    if not report.ok:
        raise BundleError(
            f"{source}: the int8 form does not agree with the bundle's float weights on its {len(probes)} probe "
            f"inputs ({'; '.join(report.failures())}): refusing to serve it"
        )


def _classes(outputs: Tensor) -> bool:
    return outputs.dim() == 2 and outputs.shape[1] > 1
