"""The int8 form a bundle may carry (``trainfer quantize``): its files, writing them, and serving them checked.

Beside the float deploy form, such a bundle holds :data:`QUANTIZED_FILE` (the QDQ ONNX file, manifest
inside), ``probes.safetensors`` (validation inputs on which both forms agree) and :data:`QUANTIZATION_FILE`
(``{"format": "trainfer-quantized", "file": ..., "sha256": ..., "probes": {...}, "made_by": ..., "report": {...}}``).
:func:`write_int8_form` writes them (:class:`trainfer.serve.quantize.QuantizedModel.save`, and
:func:`trainfer.serve.gated.save_compiled` for an int8 choice); :func:`serve_quantized` serves the int8
form once the file matches its digest, holds only the operators trainfer writes, and agrees with the
float weights on the probes; :func:`retire_int8_form` removes a form ``trainfer compile`` wrote once a
later choice no longer uses it.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from trainfer.atomic import atomic_file
from trainfer.digest import sha256
from trainfer.errors import BundleError, InputError
from trainfer.jsonfile import read_json
from trainfer.readfile import open_regular, present
from trainfer.serve.bundle_format import (
    MADE_BY,
    QUANTIZATION_FILE,
    QUANTIZED_FILE,
    RETIRED_FILE,
    int8_record,
    own_int8_record,
)
from trainfer.serve.engines import CompiledModel, int8_engine
from trainfer.serve.int8_cost import check_int8_cost, float_flops
from trainfer.serve.int8_ops import check_int8_ops
from trainfer.serve.runtime_record import (
    QUANTIZED_RUNTIMES,
    CandidateRecord,
    RuntimeRecord,
    machine_info,
    runtime_versions,
    thread_settings,
)
from trainfer.serve.served_checks import PROBES_FILE
from trainfer.serve.weights import write_safetensors

# The int8 form's file names (QUANTIZED_FILE, QUANTIZATION_FILE, RETIRED_FILE) and its writers (MADE_BY)
# are part of the bundle's layout, in trainfer.serve.bundle_format, which lists every file a bundle may hold.

__all__ = [
    "MADE_BY",
    "INT8_FILES",
    "QUANTIZATION_FILE",
    "QUANTIZED_FILE",
    "RETIRED_FILE",
    "compile_made",
    "retire_int8_form",
    "serve_quantized",
    "write_int8_form",
]

#: The files :func:`write_int8_form` writes into a bundle, in the order it writes them.
INT8_FILES = (QUANTIZED_FILE, PROBES_FILE, QUANTIZATION_FILE)


def write_int8_form(
    directory: Path, onnx_bytes: bytes, probes: Tensor, report: dict[str, Any], made_by: str = MADE_BY[0]
) -> None:
    """Write the int8 form's files into the bundle ``directory`` (a staging directory that the caller
    then puts in place atomically, or a bundle that ``trainfer.compile``'s int8 choice is saved into):
    each file is replaced atomically, the record naming the others' sha256 (and ``made_by``, one of
    :data:`MADE_BY`) last."""
    with atomic_file(directory / QUANTIZED_FILE) as tmp:
        tmp.write_bytes(onnx_bytes)
    with atomic_file(directory / PROBES_FILE) as tmp:
        write_safetensors({"inputs": probes}, tmp)
    entry = {
        "format": "trainfer-quantized",
        "format_version": 2,
        "file": QUANTIZED_FILE,
        "sha256": sha256(onnx_bytes),
        "probes": {"file": PROBES_FILE, "sha256": sha256(directory / PROBES_FILE)},
        "made_by": made_by,
        "report": report,
    }
    with atomic_file(directory / QUANTIZATION_FILE) as tmp:
        tmp.write_text(json.dumps(entry, indent=2) + "\n", encoding="utf-8")


def serve_quantized(bundle: str | os.PathLike[str], runtime: str | None = None, **load_options: Any) -> CompiledModel:
    """The int8 form of a bundle (``quantized.onnx``), once checked against the bundle's float form.

    The file must match its recorded sha256, hold only the operators trainfer writes
    (:func:`~trainfer.serve.int8_ops.check_int8_ops`) and compute about what the float model does
    (:func:`~trainfer.serve.int8_cost.check_int8_cost`, before any runtime sees it), and then agree with
    the float weights on the probe inputs stored beside it (:func:`trainfer.serve.served_checks.check_int8_form`;
    the float form is loaded with ``load_options``, :func:`trainfer.load`'s ``factory``/``trust_factory``): a
    digest proves nothing, whoever replaces the file recomputes it. ``runtime``: ``onnxruntime`` or ``openvino``
    (default: the runtime the file was made and gated for, as its settings record).
    """
    from trainfer.serve.bundle import load, recipe_from
    from trainfer.serve.bundle_format import read_manifest
    from trainfer.serve.served_checks import check_int8_form, read_probes

    directory = Path(bundle)
    entry = _quantization_entry(directory)
    runtime = runtime or _made_for(entry)
    if runtime not in QUANTIZED_RUNTIMES:
        raise InputError(f"an int8 form runs on {list(QUANTIZED_RUNTIMES)}; got runtime {runtime!r}")
    file = directory / QUANTIZED_FILE
    if not present(file):
        raise BundleError(f"bundle {str(directory)!r} lacks its int8 form {QUANTIZED_FILE!r}")
    with open_regular(file) as handle:
        data = handle.read()
    digest = sha256(data)
    if digest != entry.get("sha256"):
        raise BundleError(
            f"{str(file)!r} does not match {QUANTIZATION_FILE}: sha256 expected {entry.get('sha256')}, got {digest}"
        )
    model = check_int8_ops(data, repr(str(file)))  # before any runtime parses it: only the operators trainfer writes
    manifest = read_manifest(directory)
    shape = manifest.input_shape
    if not shape:
        raise BundleError(f"bundle {str(directory)!r} records no input shape to check its int8 form on")
    reference = load(directory, **load_options)
    weights = sum(t.numel() for t in reference.state_dict().values())
    check_int8_cost(model, shape, weights, float_flops(reference, shape), repr(str(file)))  # and how much
    threads = torch.get_num_threads()
    try:
        engine = int8_engine(runtime, file, manifest, threads, data)  # the bytes checked, not the file again
    except ImportError:
        raise
    except Exception as error:  # the file is untrusted: onnxruntime and OpenVINO raise their own types
        raise BundleError(f"{runtime} cannot load the int8 form {str(file)!r}: {error}"[:2000]) from None
    probes = read_probes(directory, entry, shape[1:])
    check_int8_form(engine, reference, probes, repr(str(file)))
    report = entry.get("report")
    gate = report.get("gate") if isinstance(report, dict) else None
    candidate = CandidateRecord(runtime, "int8", "ok", "accuracy gate measured at quantization", gate=gate)
    record = RuntimeRecord(
        runtime, "int8", "bundle", [], [candidate], thread_settings(threads), machine_info(), runtime_versions()
    )
    return CompiledModel(engine, record, replace(recipe_from(manifest), form="deploy"))


def _made_for(entry: dict[str, Any]) -> str:
    """The runtime an int8 record says its file was made and gated for (records without one: ONNX Runtime)."""
    report = entry.get("report")
    settings = report.get("settings") if isinstance(report, dict) else None
    runtime = settings.get("runtime", QUANTIZED_RUNTIMES[0]) if isinstance(settings, dict) else QUANTIZED_RUNTIMES[0]
    if runtime not in QUANTIZED_RUNTIMES:
        raise BundleError(f"{QUANTIZATION_FILE}: the int8 form is made for {runtime!r}, not {list(QUANTIZED_RUNTIMES)}")
    return str(runtime)


def compile_made(directory: Path, recorded_int8: bool) -> bool:
    """Whether the int8 form in the bundle ``directory`` is one ``trainfer compile`` wrote: its
    :data:`QUANTIZATION_FILE` is a regular file (not a link) holding trainfer's int8 record, which says
    ``"made_by": "trainfer compile"``, or (a record written before ``made_by`` existed) the bundle's
    ``runtime.json`` serves it (``recorded_int8``: it chose int8). A ``trainfer quantize`` bundle's own
    int8 form is not. A :data:`QUANTIZATION_FILE` that is not a regular file (a FIFO, a directory, a
    device) is refused with :class:`BundleError` naming what it is, as a load refuses it, never skipped."""
    file = directory / QUANTIZATION_FILE
    if not present(file):
        return False
    entry = own_int8_record(file)
    if entry is None:
        return False
    return entry.get("made_by") == MADE_BY[1] or ("made_by" not in entry and recorded_int8)


def retire_int8_form(directory: Path, stale: bool) -> None:
    """Remove the int8 form ``trainfer compile`` wrote into the bundle ``directory`` once its
    ``runtime.json`` no longer uses it (``stale``), and finish a removal a crash interrupted. After
    each step the bundle loads and serves what ``runtime.json`` records:

    1. ``stale``: :data:`QUANTIZATION_FILE` is renamed :data:`RETIRED_FILE` (atomic: from then on no
       reader sees an int8 form);
    2. each file :data:`RETIRED_FILE` names (:data:`QUANTIZED_FILE`, the probes) is removed if it still
       is what trainfer wrote: a regular file, not a link, with the recorded sha256. Where a live
       :data:`QUANTIZATION_FILE` exists (an int8 form written since), those names are its files: kept;
    3. :data:`RETIRED_FILE` is removed.
    """
    if stale:
        os.replace(directory / QUANTIZATION_FILE, directory / RETIRED_FILE)
    entry = own_int8_record(directory / RETIRED_FILE)
    if entry is None:
        return
    if not os.path.lexists(directory / QUANTIZATION_FILE):
        probes = entry.get("probes")
        probes_digest = probes.get("sha256") if isinstance(probes, dict) else None
        written = {QUANTIZED_FILE: entry.get("sha256"), PROBES_FILE: probes_digest}
        for name, digest in written.items():
            if _still_written(directory / name, digest):
                (directory / name).unlink()
    (directory / RETIRED_FILE).unlink()


def _still_written(file: Path, digest: Any) -> bool:
    """Whether ``file`` still is what trainfer wrote: a regular file, not a link, with the sha256 ``digest``.
    A FIFO or a device put there after the first look is not (opened without blocking, never waited on)."""
    if file.is_symlink() or not file.is_file():
        return False
    try:
        return sha256(file) == digest
    except BundleError:
        return False


def _quantization_entry(directory: Path) -> dict[str, Any]:
    """The bundle's int8 record, checked against its schema (:mod:`trainfer.serve.quantization_schema`)."""
    from trainfer.serve.quantization_schema import check_int8_record

    file = directory / QUANTIZATION_FILE
    entry = int8_record(read_json(file, error=BundleError), file)
    check_int8_record(entry, repr(str(file)))
    return entry
