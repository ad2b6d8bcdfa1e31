"""Autoregressive greedy and beam search with the semantics of Hugging Face ``generate``.

The model plugs in through :class:`~trainfer.decoding.interface.StepModel`. Conventions:

* ``max_length`` counts generated tokens, the EOS included (the ``bos`` start token is not counted).
* A hypothesis' score is ``sum of its token log-probs / length ** length_penalty`` with ``length`` its
  OWN number of generated tokens (EOS included): never the padded length of the batch.
* Beam search ranks ``2 * num_beams`` candidates per item and step, so beams that end with EOS do
  not shrink the beam: an EOS candidate joins the item's finished hypotheses only when it ranks
  within the first ``num_beams`` candidates, and the ``num_beams`` best non-EOS candidates go on.
  Finished hypotheses are never expanded again. An item keeps its ``num_beams`` best finished ones.
* ``early_stopping``: True, an item is done once it has ``num_beams`` finished hypotheses; False
  (HF's heuristic), also when the best running beam, scored at its current length, cannot beat the
  worst finished one; ``"never"``, when no running beam can beat it at any length up to
  ``max_length`` (exact, for normalised log-probs).
* Each item has its own done flag; done items are fed ``pad`` and ignored. At ``max_length`` the
  beams still running are finalised (scored at ``max_length``, ``finished=False``).

Everything per step is a fixed number of tensor operations over ``(N, num_beams, ...)``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from trainfer.decoding.checks import (
    MAX_LENGTH,
    accumulation_dtype,
    check_beam_width,
    check_finite_float,
    check_int,
    check_scores,
    check_token_id,
)
from trainfer.decoding.hypothesis import Hypothesis
from trainfer.decoding.interface import batch_size, reorder
from trainfer.errors import DecodingError


@dataclass
class _Set:
    """Hypotheses of every item, ``(N, K, ...)``: score, summed log-prob, tokens, their log-probs, length, ended."""

    score: torch.Tensor
    log_prob: torch.Tensor
    tokens: torch.Tensor
    token_lp: torch.Tensor
    length: torch.Tensor
    ended: torch.Tensor

    @classmethod
    def empty(cls, batch: int, width: int, max_length: int, pad: int, dtype: torch.dtype) -> _Set:
        return cls(
            torch.full((batch, width), -torch.inf, dtype=dtype),
            torch.full((batch, width), -torch.inf, dtype=dtype),
            torch.full((batch, width, max_length), pad, dtype=torch.long),
            torch.zeros(batch, width, max_length, dtype=dtype),
            torch.zeros(batch, width, dtype=torch.long),
            torch.zeros(batch, width, dtype=torch.bool),
        )

    def take(self, index: torch.Tensor) -> _Set:
        """The hypotheses at ``index`` ``(N, K')`` of each item."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            idx = index.view(index.shape + (1,) * (value.dim() - 2)).expand(index.shape + value.shape[2:])
            out[f.name] = value.gather(1, idx)
        return _Set(**out)

    def merged_best(self, other: _Set, width: int) -> _Set:
        """The ``width`` best by score of both sets, per item, best first."""
        both = _Set(*(torch.cat([getattr(self, f.name), getattr(other, f.name)], dim=1) for f in fields(self)))
        return both.take(both.score.topk(width, dim=1).indices)


def _check_settings(bos: int, eos: int, pad: int | None, max_length: int, length_penalty: float) -> int:
    """Checks the settings that do not need the vocabulary; returns the pad id (eos when None)."""
    check_int("max_length", max_length, 1, MAX_LENGTH)
    check_finite_float("length_penalty", length_penalty)
    for name, value in (("bos", bos), ("eos", eos), ("pad", pad)):
        if value is not None:
            check_int(name, value, 0, 2**62)
    return eos if pad is None else pad


def _step(
    model: Any, state: Any, tokens: torch.Tensor, vocab: int | None, ids: dict[str, int]
) -> tuple[torch.Tensor, Any]:
    """One model step, its log-probs checked: ``(rows, V)`` with V the same every step and >= 2."""
    rows = tokens.shape[0]
    log_probs, state = model.step(state, tokens)
    log_probs = check_scores(log_probs, "step()'s log_probs", (rows, vocab))
    if vocab is None:
        if log_probs.shape[1] < 2:
            raise DecodingError(f"step() returned {log_probs.shape[1]} classes; a vocabulary needs at least 2")
        for name, value in ids.items():
            check_token_id(name, value, log_probs.shape[1])
    return log_probs, state


def _encode(model: Any, inputs: Any) -> tuple[Any, int]:
    if not callable(getattr(model, "encode", None)) or not callable(getattr(model, "step", None)):
        raise DecodingError(
            "the model needs encode(inputs) and step(state, tokens) methods (see trainfer.decoding.StepModel)"
        )
    state = model.encode(inputs)
    return state, batch_size(state)


def greedy_search(
    model: Any,
    inputs: Any,
    *,
    bos: int,
    eos: int,
    max_length: int,
    pad: int | None = None,
    length_penalty: float = 1.0,
) -> list[Hypothesis]:
    """Greedy decoding: at each step the most likely token, until EOS or ``max_length``.

    Returns one hypothesis per item (``score`` as in beam search, so the two compare).
    """
    pad = _check_settings(bos, eos, pad, max_length, length_penalty)
    with torch.no_grad():
        state, n = _encode(model, inputs)
        tokens = torch.full((n,), bos, dtype=torch.long)
        vocab = None
        out_tokens = torch.full((n, max_length), pad, dtype=torch.long)
        out_lp: torch.Tensor | None = None
        length = torch.zeros(n, dtype=torch.long)
        ended = torch.zeros(n, dtype=torch.bool)
        for t in range(max_length):
            log_probs, state = _step(model, state, tokens, vocab, {"bos": bos, "eos": eos, "pad": pad})
            vocab = log_probs.shape[1]
            if out_lp is None:
                out_lp = torch.zeros(n, max_length, dtype=accumulation_dtype(log_probs.dtype))
            best_lp, best = log_probs.max(dim=1)
            best = torch.where(ended, pad, best)
            out_tokens[:, t] = best
            out_lp[:, t] = torch.where(ended, 0.0, best_lp.to(out_lp.dtype))
            length += (~ended).long()
            ended |= best == eos
            tokens = best
            if bool(ended.all()):
                break
    assert out_lp is not None  # max_length >= 1: at least one step ran
    summed = out_lp.sum(dim=1)
    score = summed / length.to(summed.dtype) ** length_penalty
    results = _Set(*(v[:, None] for v in (score, summed, out_tokens, out_lp, length, ended)))
    return [row[0] for row in _hypotheses(results, 1)]


def _done(
    early_stopping: bool | str, finished: _Set, running: torch.Tensor, t: int, max_length: int, penalty: float
) -> torch.Tensor:
    """Items whose finished hypotheses can no longer be displaced (see the module docstring)."""
    full = torch.isfinite(finished.score).all(dim=1)
    if early_stopping is True:
        return full
    best = running.max(dim=1).values
    if early_stopping == "never":
        length = max_length if penalty > 0 else min(t + 2, max_length)
    else:
        length = t + 1
    bound = best / float(length) ** penalty
    return full & (finished.score[:, -1] >= bound) | torch.isneginf(best)


def beam_search(
    model: Any,
    inputs: Any,
    *,
    bos: int,
    eos: int,
    max_length: int,
    num_beams: int = 4,
    pad: int | None = None,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_return_sequences: int = 1,
) -> list[list[Hypothesis]]:
    """Beam search over an autoregressive model (HF ``generate`` semantics, see the module docstring).

    Args:
        model: has ``encode(inputs) -> state`` and ``step(state, tokens) -> (log_probs, state)``.
        inputs: passed to ``encode`` as is.
        bos: the start token fed at the first step; eos: ends a hypothesis; pad: fed to done items
            and fills returned tensors (default: eos).
        max_length: generated tokens at most (EOS included), in ``[1, MAX_LENGTH]``.
        num_beams: beam width in ``[1, MAX_BEAM_WIDTH]``.
        length_penalty: alpha in ``score = log_prob / length ** alpha``.
        early_stopping: True, False or ``"never"``.
        num_return_sequences: hypotheses returned per item, in ``[1, num_beams]``.

    Returns:
        per item, ``num_return_sequences`` hypotheses best first (fewer if fewer exist).
    """
    pad = _check_settings(bos, eos, pad, max_length, length_penalty)
    width = check_beam_width(num_beams, "num_beams")
    check_int("num_return_sequences", num_return_sequences, 1, width)
    if early_stopping not in (True, False, "never"):
        raise DecodingError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    with torch.no_grad():
        state, n = _encode(model, inputs)
        state = reorder(model, state, torch.arange(n).repeat_interleave(width), n)
        finished = _search(model, state, n, width, bos, eos, pad, max_length, length_penalty, early_stopping)
    return _hypotheses(finished, num_return_sequences)


def _search(
    model: Any,
    state: Any,
    n: int,
    width: int,
    bos: int,
    eos: int,
    pad: int,
    max_length: int,
    penalty: float,
    early_stopping: bool | str,
) -> _Set:
    """The step loop; returns each item's ``width`` best finished hypotheses (open beams finalised)."""
    rows = n * width
    tokens = torch.full((rows,), bos, dtype=torch.long)
    vocab: int | None = None
    running: _Set | None = None
    finished: _Set | None = None
    done = torch.zeros(n, dtype=torch.bool)
    offsets = (torch.arange(n) * width)[:, None]
    for t in range(max_length):
        log_probs, state = _step(model, state, tokens, vocab, {"bos": bos, "eos": eos, "pad": pad})
        vocab = log_probs.shape[1]
        if running is None:
            dtype = accumulation_dtype(log_probs.dtype)
            running = _Set.empty(n, width, max_length, pad, dtype)
            running.log_prob[:, 0] = 0.0  # one live beam at the start: the others would repeat it
            finished = _Set.empty(n, width, max_length, pad, dtype)
        assert finished is not None
        step_lp = log_probs.view(n, width, vocab).to(running.log_prob.dtype)
        cand = (running.log_prob[:, :, None] + step_lp).view(n, width * vocab)
        top, index = cand.topk(min(2 * width, width * vocab), dim=1)
        beam, token = index // vocab, index % vocab
        token_lp = step_lp.view(n, -1).gather(1, index)
        is_eos = token == eos
        # an EOS candidate is finished if it ranks within the beam; done items take nothing more
        rank = torch.arange(top.shape[1])[None, :]
        keep = is_eos & (rank < width) & torch.isfinite(top) & ~done[:, None]
        if bool(keep.any()):
            ended = _extend(running, beam, top, token, token_lp, t)
            ended.ended = is_eos
            ended.score = torch.where(keep, top / float(t + 1) ** penalty, -torch.inf)
            finished = finished.merged_best(ended, width)
        # the `width` best non-EOS candidates go on (a stable sort puts them first, in rank order)
        going = torch.sort(is_eos.to(torch.uint8), dim=1, stable=True).indices[:, :width]
        parent = beam.gather(1, going)
        top, token, token_lp = top.gather(1, going), token.gather(1, going), token_lp.gather(1, going)
        running = _extend(running, parent, torch.where(token == eos, -torch.inf, top), token, token_lp, t)
        state = reorder(model, state, (offsets + parent).view(-1), rows)
        if t + 1 == max_length:
            break
        done |= _done(early_stopping, finished, running.log_prob, t, max_length, penalty)
        if bool(done.all()):
            return finished
        tokens = torch.where(done[:, None], pad, running.tokens[:, :, t]).view(-1)
    assert running is not None and finished is not None
    open_ = torch.isfinite(running.log_prob) & ~done[:, None]
    at_end = running.log_prob / running.length.to(running.log_prob.dtype) ** penalty
    running.score = torch.where(open_, at_end, -torch.inf)
    return finished.merged_best(running, width)


def _extend(
    running: _Set, parent: torch.Tensor, log_prob: torch.Tensor, token: torch.Tensor, token_lp: torch.Tensor, t: int
) -> _Set:
    """The running beams ``parent`` ``(N, K)`` extended by ``token`` at position ``t``, summing to ``log_prob``."""
    out = running.take(parent)
    out.score, out.log_prob = log_prob, log_prob
    out.tokens[:, :, t] = token
    out.token_lp[:, :, t] = token_lp
    out.length = out.length + 1
    return out


def _hypotheses(found: _Set, count: int) -> list[list[Hypothesis]]:
    """The first ``count`` finite hypotheses of each item (already sorted best first)."""
    lists = [getattr(found, f.name)[:, :count].tolist() for f in fields(found)]
    out = []
    for score_r, lp_r, tok_r, tlp_r, len_r, end_r in zip(*lists):
        row = []
        for score, lp, tok, tlp, length, ended in zip(score_r, lp_r, tok_r, tlp_r, len_r, end_r):
            if score == -float("inf"):
                continue
            kept = length - 1 if ended else length
            row.append(Hypothesis(tuple(tok[:kept]), score, lp, tuple(tlp[:kept]), bool(ended)))
        out.append(row)
    return out
