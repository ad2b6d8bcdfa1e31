"""CTC decoding: greedy (best path) and prefix beam search, vectorised over batch and beam.

Inputs are batch-first per-frame log-probabilities ``(N, T, C)`` with one class, ``blank``, meaning
"no label". A label sequence's probability is the sum over its alignments: frame paths that give the
sequence once repeats are merged and blanks dropped (Graves et al., 2006).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from trainfer.decoding.checks import (
    accumulation_dtype,
    check_at_most_zero,
    check_beam_width,
    check_int,
    check_items,
    check_lengths,
    check_prior_scale,
    check_scores,
    check_token_id,
    refuse_impossible,
)
from trainfer.decoding.hypothesis import Hypothesis
from trainfer.errors import DecodingError

Prior = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``prior(prefixes, lengths) -> (M, C)``: log-scores for appending each class to each prefix.

``prefixes`` is ``(M, L)`` int64 (entries past ``lengths`` are -1), ``lengths`` is ``(M,)``. A finite
value, at most :data:`~trainfer.decoding.checks.MAX_PRIOR_SCORE` in magnitude, is added to the prefix's
ranking score (shallow fusion with a language model, a bias); ``-inf`` forbids the extension (a lexicon).
It must depend on the prefix only; the blank column is ignored.
"""


def _frames(log_probs: object, blank: int, lengths: object) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Checked ``(N, T, C)`` log-probs, blank id (an ``int``) and per-item frame counts."""
    scores = check_scores(log_probs, "log_probs", (None, None, None))
    check_items(scores.shape[0], "log_probs")
    if scores.shape[2] < 2:
        raise DecodingError(f"log_probs needs at least 2 classes (blank and a label), got {scores.shape[2]}")
    blank = check_token_id("blank", blank, scores.shape[2])
    return scores, blank, check_lengths(lengths, scores.shape[0], scores.shape[1])


def _best_path(scores: torch.Tensor, blank: int, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per frame: the best class, and whether it emits a label (not blank, not a repeat, inside the length)."""
    best = scores.argmax(dim=2)
    previous = torch.nn.functional.pad(best, (1, 0), value=-1)[:, :-1]
    inside = torch.arange(scores.shape[1])[None, :] < lengths[:, None]
    return best, (best != previous) & (best != blank) & inside


def ctc_greedy(log_probs: torch.Tensor, blank: int = 0, lengths: object = None) -> list[list[int]]:
    """Best-path decoding: per frame the most likely class, repeats merged, then blanks dropped.

    Args:
        log_probs: ``(N, T, C)`` per-frame log-probabilities (or any monotone scores).
        blank: the blank class id.
        lengths: optional ``(N,)`` frame counts; frames past an item's length are ignored.

    Returns:
        per item, its token ids.
    """
    scores, blank, frames = _frames(log_probs, blank, lengths)
    best, emits = _best_path(scores, blank, frames)
    return [row[keep].tolist() for row, keep in zip(best, emits)]


def ctc_greedy_confidences(log_probs: torch.Tensor, blank: int = 0, lengths: object = None) -> list[Hypothesis]:
    """Best-path decoding with confidences: per token, the log-prob of the frame that emitted it.

    ``score`` and ``log_prob`` are the best path's log-probability (the sum of each frame's maximum),
    a lower bound of the sequence's probability summed over alignments.
    """
    scores, blank, frames = _frames(log_probs, blank, lengths)
    check_at_most_zero(scores, "log_probs")
    best, emits = _best_path(scores, blank, frames)
    top = scores.max(dim=2).values
    inside = torch.arange(scores.shape[1])[None, :] < frames[:, None]
    path = torch.where(inside, top, torch.zeros_like(top)).sum(dim=1).tolist()
    impossible = [i for i, p in enumerate(path) if p == -float("inf")]
    if impossible:
        refuse_impossible(impossible, "log_probs")
    return [
        Hypothesis(tuple(row[keep].tolist()), p, p, tuple(conf[keep].tolist()))
        for row, keep, conf, p in zip(best, emits, top, path)
    ]


class _Beams:
    """The beam of every item: prefixes and their blank / non-blank ending log-probs, all ``(N, B, ...)``."""

    def __init__(self, batch: int, width: int, frames: int, dtype: torch.dtype):
        self.tokens = torch.full((batch, width, frames), -1, dtype=torch.long)
        self.length = torch.zeros(batch, width, dtype=torch.long)
        self.last = torch.full((batch, width), -1, dtype=torch.long)
        self.p_blank = torch.full((batch, width), -torch.inf, dtype=dtype)
        self.p_blank[:, 0] = 0.0  # one live beam: the empty prefix
        self.p_label = torch.full((batch, width), -torch.inf, dtype=dtype)
        self.prior = torch.zeros(batch, width, dtype=dtype)

    def total(self) -> torch.Tensor:
        """log P(prefix) summed over the alignments seen so far."""
        return torch.logaddexp(self.p_blank, self.p_label)

    def parents(self, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For each beam j, whether another live beam i holds its prefix minus the last token, and i.

        Exact (token by token), ``O(B^2 * upto)`` per item: prefixes are at most ``upto`` long.
        """
        live = torch.isfinite(self.total())
        tokens = self.tokens[:, :, :upto]
        same = tokens[:, :, None, :] == tokens[:, None, :, :]  # (N, i, j, L)
        past = torch.arange(upto)[None, None, None, :] >= self.length[:, :, None, None]
        prefix = (same | past).all(dim=3)
        match = prefix & (self.length[:, None, :] == self.length[:, :, None] + 1)
        match &= live[:, :, None] & live[:, None, :]
        return match.any(dim=1), match.to(torch.uint8).argmax(dim=1)


def _candidates(beams: _Beams, frame: torch.Tensor, blank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blank-ending and label-ending log-probs of every (beam, class) continuation, ``(N, B, C)``.

    Column ``blank`` is "the same prefix" (a blank or a repeated last label is read); column ``c`` is
    "the prefix extended by c", which after a label ``c`` needs a blank between the two.
    """
    n, width = beams.length.shape
    classes = frame.shape[1]
    total = beams.total()
    stay_blank = total + frame[:, blank, None]
    repeat = frame.gather(1, beams.last.clamp(min=0))
    stay_label = torch.where(beams.last >= 0, beams.p_label + repeat, -torch.inf)
    is_last = torch.arange(classes)[None, None, :] == beams.last[:, :, None]
    extend = torch.where(is_last, beams.p_blank[:, :, None], total[:, :, None]) + frame[:, None, :]
    extend[:, :, blank] = -torch.inf
    # an extension that equals a prefix already in the beam is the same hypothesis: merge it into that one
    has_parent, parent = beams.parents(int(beams.length.max()))
    flat = torch.cat([extend.reshape(n, width * classes), extend.new_full((n, 1), -torch.inf)], dim=1)
    where = torch.where(has_parent, parent * classes + beams.last.clamp(min=0), width * classes)
    stay_label = torch.logaddexp(stay_label, flat.gather(1, where))
    flat = flat.scatter(1, where, -torch.inf)[:, :-1]
    extend = flat.view(n, width, classes)
    p_blank = torch.full_like(extend, -torch.inf)
    p_blank[:, :, blank] = stay_blank
    extend[:, :, blank] = stay_label
    return p_blank, extend


def _advance(beams: _Beams, frame: torch.Tensor, blank: int, active: torch.Tensor, prior: Prior | None) -> None:
    """One frame: score every continuation, keep the best ``B`` per item (items past their length stay)."""
    n, width = beams.length.shape
    classes = frame.shape[1]
    p_blank, p_label = _candidates(beams, frame, blank)
    bonus = torch.zeros_like(p_label)
    if prior is not None:
        upto = max(int(beams.length.max()), 1)
        rows = n * width
        got = prior(beams.tokens[:, :, :upto].reshape(rows, upto), beams.length.reshape(rows))
        got = check_scores(got, "the prior's output", (rows, classes)).to(bonus.dtype)
        bonus = got.view(n, width, classes).clone()
        bonus[:, :, blank] = 0.0
        check_prior_scale(bonus)
    rank = torch.logaddexp(p_blank, p_label) + beams.prior[:, :, None] + bonus
    chosen = rank.view(n, -1).topk(width, dim=1).indices
    parent, label = chosen // classes, chosen % classes
    extended = label != blank
    tokens = beams.tokens.gather(1, parent[:, :, None].expand_as(beams.tokens)).clone()
    length = beams.length.gather(1, parent)
    tokens.scatter_(2, length[:, :, None], torch.where(extended, label, -1)[:, :, None])  # -1: nothing written
    new = {
        "tokens": tokens,
        "length": length + extended.long(),
        "last": torch.where(extended, label, beams.last.gather(1, parent)),
        "p_blank": p_blank.view(n, -1).gather(1, chosen),
        "p_label": p_label.view(n, -1).gather(1, chosen),
        "prior": (beams.prior[:, :, None] + bonus).view(n, -1).gather(1, chosen),
    }
    for name, value in new.items():
        old = getattr(beams, name)
        keep = active.view((n,) + (1,) * (old.dim() - 1))
        setattr(beams, name, torch.where(keep, value, old))


def ctc_beam_search(
    log_probs: torch.Tensor,
    beam_width: int = 8,
    blank: int = 0,
    n_best: int = 1,
    lengths: object = None,
    prior: Prior | None = None,
) -> list[list[Hypothesis]]:
    """CTC prefix beam search: the ``n_best`` most likely label sequences per item, with log-probs.

    Each beam entry is a distinct prefix with two log-probs, of its alignments ending in a blank and
    ending in its last label; a frame extends every prefix by every class, merges extensions that
    reach the same prefix (exactly, token by token) and keeps the ``beam_width`` best. With a beam as
    wide as the number of prefixes the search is exact: each returned ``log_prob`` is the log of the
    sum over all alignments of that sequence.

    Args:
        log_probs: ``(N, T, C)`` per-frame log-probabilities.
        beam_width: prefixes kept per item, in ``[1, MAX_BEAM_WIDTH]``.
        blank: the blank class id.
        n_best: hypotheses returned per item, in ``[1, beam_width]`` (fewer when fewer have
            non-zero probability).
        lengths: optional ``(N,)`` frame counts.
        prior: optional token-level prior or lexicon hook (see :data:`Prior`); it shapes the ranking
            and each hypothesis' ``score``, not its ``log_prob``.

    Returns:
        per item, hypotheses sorted best first.
    """
    scores, blank, frames = _frames(log_probs, blank, lengths)
    check_at_most_zero(scores, "log_probs")
    width = check_beam_width(beam_width)
    check_int("n_best", n_best, 1, width)
    batch, steps, _ = scores.shape
    scores = scores.to(accumulation_dtype(scores.dtype))
    beams = _Beams(batch, width, max(steps, 1), scores.dtype)
    with torch.no_grad():
        for t in range(steps):
            _advance(beams, scores[:, t], blank, t < frames, prior)
    return _collect(beams, n_best)


def _collect(beams: _Beams, n_best: int) -> list[list[Hypothesis]]:
    """The ``n_best`` live beams of each item, best first, as hypotheses."""
    log_prob = beams.total()
    score = log_prob + beams.prior
    order = score.argsort(dim=1, descending=True)[:, :n_best]
    picked = [t.gather(1, order).tolist() for t in (score, log_prob, beams.length)]
    tokens = beams.tokens.gather(1, order[:, :, None].expand(-1, -1, beams.tokens.shape[2])).tolist()
    out = []
    for s_row, p_row, n_row, t_row in zip(*picked, tokens):
        live = zip(s_row, p_row, n_row, t_row)
        out.append([Hypothesis(tuple(t[:n]), s, p) for s, p, n, t in live if p > -float("inf")])
    impossible = [i for i, row in enumerate(out) if not row]
    if impossible:
        refuse_impossible(impossible, "log_probs")
    return out
