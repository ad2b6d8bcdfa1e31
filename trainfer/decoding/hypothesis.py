"""The typed result of every decoder: one candidate sequence and its scores."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hypothesis:
    """One decoded sequence.

    Attributes:
        tokens: the token ids, without blanks (CTC) and without the end-of-sequence token.
        score: the score the search ranked by. Autoregressive: ``log_prob / length ** length_penalty``
            where ``length`` is this hypothesis' own number of generated tokens (the EOS counted).
            CTC: ``log_prob`` plus the prior's log-scores when a prior was given.
        log_prob: the model's log-probability of the sequence. Autoregressive: the sum of the chosen
            tokens' log-probs, the EOS included. CTC: the log of the sum over all alignments.
        token_log_probs: per token of ``tokens``, the log-prob the model gave it when it was chosen
            (autoregressive; CTC greedy via :func:`~trainfer.decoding.ctc_greedy_confidences`), or None.
        finished: autoregressive: True when the sequence ended with EOS, False when it was cut at
            ``max_length``; CTC: always True.
    """

    tokens: tuple[int, ...]
    score: float
    log_prob: float
    token_log_probs: tuple[float, ...] | None = None
    finished: bool = True
