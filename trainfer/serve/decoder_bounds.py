"""Bounds on the decoder settings a bundle (or a caller's ``top_k``) may ask of a served sequence model.

A manifest is read from a file: its ``decoder`` must not turn one prediction into minutes of compute.
An autoregressive search costs about ``beam_width × max_length`` model steps per item, so the product is
bounded as well as each factor. A CTC beam search costs about ``frames × beam × (frames × (beam + 1) +
classes)`` elementary steps per item (:func:`ctc_work_problem`): the frames come from the model's output,
which the bundle's graph chooses, so that product is bounded too. The library's own searches
(:mod:`trainfer.decoding`) keep their wider bounds (:data:`trainfer.decoding.MAX_BEAM_WIDTH`,
:data:`trainfer.decoding.MAX_LENGTH`): a Python caller chooses its own cost. Pure Python (no torch), so
that the manifest schema can use it.
"""

from __future__ import annotations

#: The widest beam (and the most hypotheses, ``n_best`` or ``top_k``) a served decoder runs.
MAX_SERVED_BEAM_WIDTH = 64
#: The longest ``max_length`` a served autoregressive decoder runs.
MAX_SERVED_LENGTH = 512
#: The most ``beam_width × max_length`` (model steps per item) of a served autoregressive search.
MAX_SERVED_SEARCH_WORK = 4096
#: The most elementary steps (see :func:`ctc_work_problem`) of a served CTC beam search, per item: about
#: 2 s of CPU at 1 thread. 2000 frames, beam 16, 100 classes (long speech or OCR lines) cost 1.1e9.
MAX_SERVED_CTC_WORK = 2**31

__all__ = [
    "MAX_SERVED_BEAM_WIDTH",
    "MAX_SERVED_CTC_WORK",
    "MAX_SERVED_LENGTH",
    "MAX_SERVED_SEARCH_WORK",
    "ctc_work_problem",
    "search_work_problem",
]


def search_work_problem(beam_width: int, max_length: int) -> str | None:
    """Why ``beam_width × max_length`` is over :data:`MAX_SERVED_SEARCH_WORK`, or None when it is not."""
    if beam_width * max_length <= MAX_SERVED_SEARCH_WORK:
        return None
    return (
        f"beam_width × max_length must be at most {MAX_SERVED_SEARCH_WORK} (model steps per item); "
        f"got {beam_width} × {max_length} = {beam_width * max_length}"
    )


def ctc_work_problem(frames: int, beam_width: int, classes: int) -> str | None:
    """Why a CTC beam search of ``beam_width`` over ``frames`` frames of ``classes`` classes costs more than
    :data:`MAX_SERVED_CTC_WORK` per item, or None when it does not.

    The cost is that of :func:`trainfer.decoding.ctc_beam_search`: each frame copies the beam's prefixes
    (``beam × frames`` tokens), compares every pair of them (``beam² × frames`` at worst) and ranks
    ``beam × classes`` continuations, so ``frames × beam × (frames × (beam + 1) + classes)`` in all.
    """
    work = frames * beam_width * (frames * (beam_width + 1) + classes)
    if work <= MAX_SERVED_CTC_WORK:
        return None
    return (
        f"a CTC beam search over {frames} frames with beam_width {beam_width} ({classes} classes) costs "
        f"{work:.3g} steps per item (frames × beam × (frames × (beam + 1) + classes)), over the bound of "
        f"{MAX_SERVED_CTC_WORK:.3g}"
    )
