"""Sequence decoding: CTC greedy and prefix beam search, autoregressive greedy and beam search.

Its own layer, directly above the base layer (it imports only :mod:`trainfer.errors`): the serving
layer and the demo models use it, users call it directly::

    from trainfer import decoding
    decoding.ctc_greedy(log_probs, blank=0)                              # (N, T, C) log-probs
    decoding.ctc_beam_search(log_probs, beam_width=8, blank=0, n_best=1)
    decoding.beam_search(model, inputs, bos=1, eos=2, max_length=20, num_beams=4)

Every search is vectorised over batch and beam: one step costs a fixed number of tensor operations,
never a Python loop over hypotheses. Results are :class:`Hypothesis` records (``.tokens``, ``.score``).
"""

from trainfer.decoding.autoregressive import beam_search, greedy_search
from trainfer.decoding.checks import LOG_PROB_SLACK, MAX_BEAM_WIDTH, MAX_LENGTH, MAX_LENGTH_PENALTY, MAX_PRIOR_SCORE
from trainfer.decoding.ctc import ctc_beam_search, ctc_greedy, ctc_greedy_confidences
from trainfer.decoding.hypothesis import Hypothesis
from trainfer.decoding.interface import StepModel, reorder_state
from trainfer.decoding.tokens import TokenTable

__all__ = [
    "LOG_PROB_SLACK",
    "MAX_BEAM_WIDTH",
    "MAX_LENGTH",
    "MAX_LENGTH_PENALTY",
    "MAX_PRIOR_SCORE",
    "Hypothesis",
    "StepModel",
    "TokenTable",
    "beam_search",
    "ctc_beam_search",
    "ctc_greedy",
    "ctc_greedy_confidences",
    "greedy_search",
    "reorder_state",
]
