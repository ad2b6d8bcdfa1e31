"""Comparisons of predictions made by different computations (batch sizes, runtimes, threads).

CPU kernels change the last bits of a number with the batch composition, the memory alignment,
the thread count and the runtime, so two such predictions are compared as numbers with a
tolerance, and their discrete outcomes (class, label, decision, top-k membership) only where the
reference's margin is clear: a class may flip between two scores closer than twice the tolerance.
Bit-exact equality stays for computations that are the same (a cache hit, a byte-identical resume).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

ATOL = 1e-6


def as_record(result: Any) -> Any:
    """A typed result as its JSON record (records and plain values pass through)."""
    return result.to_record() if hasattr(result, "to_record") else result


def assert_results_close(actual: Any, expected: Any, atol: float = ATOL) -> None:
    """Lists of typed results (or records) agree: numbers within ``atol``, outcomes where margins are clear."""
    actual, expected = list(actual), list(expected)
    assert len(actual) == len(expected), f"{len(actual)} results != {len(expected)}"
    for i, (got, want) in enumerate(zip(actual, expected, strict=True)):
        _assert_record_close(as_record(got), as_record(want), atol, f"result {i}")


def assert_same_classes(candidate: torch.Tensor, reference: torch.Tensor, atol: float | None = None) -> None:
    """``argmax`` over dim 1 agrees on every sample whose reference top-2 margin exceeds ``2 * atol``.

    ``atol`` is the rounding two computations may differ by (default ``1e-5`` of the reference's
    scale, float32's tolerance); closer scores are a tie that rounding may break either way.
    """
    assert candidate.shape == reference.shape, f"shape {tuple(candidate.shape)} != {tuple(reference.shape)}"
    reference = reference.double()
    atol = 1e-5 * float(reference.abs().max()) if atol is None else atol
    top2 = reference.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * atol
    flipped = (candidate.argmax(1) != reference.argmax(1)) & clear
    assert not flipped.any(), f"classes differ at clear margins: samples {flipped.nonzero().flatten().tolist()}"


def _assert_record_close(got: Any, want: Any, atol: float, where: str) -> None:
    if isinstance(want, dict) and "top_k" in want:
        _assert_classification_close(got, want, atol, where)
    elif isinstance(want, dict) and "decision" in want:
        _assert_binary_close(got, want, atol, where)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for key in want:
            _assert_record_close(got[key], want[key], atol, f"{where}.{key}")
    elif isinstance(want, float) or (isinstance(want, list) and want and isinstance(want[0], float)):
        np.testing.assert_allclose(got, want, atol=atol, rtol=0, err_msg=where)
    elif isinstance(want, list):  # e.g. a sequence's n-best [text, score] pairs: item by item
        assert isinstance(got, list) and len(got) == len(want), f"{where}: {got!r} != {want!r}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_record_close(g, w, atol, f"{where}[{i}]")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def _assert_classification_close(got: dict, want: dict, atol: float, where: str) -> None:
    _assert_others_equal(got, want, {"index", "label", "probability", "top_k", "spread"}, atol, where)
    got_top, want_top = dict(map(tuple, got["top_k"])), dict(map(tuple, want["top_k"]))
    for label in got_top.keys() & want_top.keys():
        assert abs(got_top[label] - want_top[label]) <= atol, f"{where}: p({label})"
    boundary = min(want_top.values())
    for label in got_top.keys() ^ want_top.keys():  # only a near-tie at the top-k boundary may swap members
        p = got_top.get(label, want_top.get(label))
        assert abs(p - boundary) <= 2 * atol, f"{where}: top-k members {sorted(got_top)} != {sorted(want_top)}"
    ranked = sorted(want_top.values(), reverse=True)
    if len(ranked) < 2 or ranked[0] - ranked[1] > 2 * atol:
        same = (got["index"], got["label"]) == (want["index"], want["label"])
        assert same, f"{where}: class differs at a clear margin"
    assert abs(got["probability"] - want["probability"]) <= atol, f"{where}: probability"


def _assert_binary_close(got: dict, want: dict, atol: float, where: str) -> None:
    _assert_others_equal(got, want, {"probability", "decision", "spread"}, atol, where)
    assert abs(got["probability"] - want["probability"]) <= atol, f"{where}: probability"
    if abs(want["probability"] - want["threshold"]) > atol:
        assert got["decision"] == want["decision"], f"{where}: decision differs at a clear margin"


def _assert_others_equal(got: dict, want: dict, handled: set[str], atol: float, where: str) -> None:
    assert got.keys() == want.keys(), f"{where}: keys {sorted(got)} != {sorted(want)}"
    for key in want.keys() - handled:
        _assert_record_close(got[key], want[key], atol, f"{where}.{key}")
    if "spread" in want:
        np.testing.assert_allclose(got["spread"], want["spread"], atol=atol, rtol=0, err_msg=f"{where}.spread")
