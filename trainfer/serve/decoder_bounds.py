"""Bounds on the decoder settings a bundle (or a caller's ``top_k``) may ask of a served sequence model.

A manifest is read from a file: its ``decoder`` must not turn one prediction into minutes of compute.
An autoregressive search costs about ``beam_width × max_length`` model steps per item, so the product is
bounded as well as each factor. The library's own searches (:mod:`trainfer.decoding`) keep their wider
bounds (:data:`trainfer.decoding.MAX_BEAM_WIDTH`, :data:`trainfer.decoding.MAX_LENGTH`): a Python caller
chooses its own cost. Pure Python (no torch), so that the manifest schema can use it.
"""

from __future__ import annotations

#: The widest beam (and the most hypotheses, ``n_best`` or ``top_k``) a served decoder runs.
MAX_SERVED_BEAM_WIDTH = 64
#: The longest ``max_length`` a served autoregressive decoder runs.
MAX_SERVED_LENGTH = 512
#: The most ``beam_width × max_length`` (model steps per item) of a served autoregressive search.
MAX_SERVED_SEARCH_WORK = 4096

__all__ = ["MAX_SERVED_BEAM_WIDTH", "MAX_SERVED_LENGTH", "MAX_SERVED_SEARCH_WORK", "search_work_problem"]


def search_work_problem(beam_width: int, max_length: int) -> str | None:
    """Why ``beam_width × max_length`` is over :data:`MAX_SERVED_SEARCH_WORK`, or None when it is not."""
    if beam_width * max_length <= MAX_SERVED_SEARCH_WORK:
        return None
    return (
        f"beam_width × max_length must be at most {MAX_SERVED_SEARCH_WORK} (model steps per item); "
        f"got {beam_width} × {max_length} = {beam_width * max_length}"
    )
