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
from trainfer.decoding.interface import batch_size, reorder, reorderer, state_device
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
        device = state_device(state)
        tokens = torch.full((n,), bos, dtype=torch.long, device=device)
        vocab = None
        out_tokens = torch.full((n, max_length), pad, dtype=torch.long, device=device)
        out_lp: torch.Tensor | None = None
        length = torch.zeros(n, dtype=torch.long, device=device)
        ended = torch.zeros(n, dtype=torch.bool, device=device)
        for t in range(max_length):
            log_probs, state = _step(model, state, tokens, vocab, {"bos": bos, "eos": eos, "pad": pad})
            vocab = log_probs.shape[1]
            if out_lp is None:
                out_lp = torch.zeros(n, max_length, dtype=accumulation_dtype(log_probs.dtype), device=device)
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
    early_stopping: bool | str, worst: torch.Tensor, best: torch.Tensor, t: int, max_length: int, penalty: float
) -> torch.Tensor:
    """Items whose finished hypotheses can no longer be displaced (see the module docstring).

    ``worst``: the last (worst) of each item's finished scores, kept best first (so the set is full
    when it is finite); ``best``: each item's best running log-prob. ``worst >= bound`` says both
    "full and not beatable" and, where ``best`` is -inf (the bound too), "nothing left running".
    """
    if early_stopping is True:
        return torch.isfinite(worst)
    if early_stopping == "never":
        length = max_length if penalty > 0 else min(t + 2, max_length)
    else:
        length = t + 1
    return worst >= best / float(length) ** penalty


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
        state = reorder(model, state, torch.arange(n, device=state_device(state)).repeat_interleave(width), n)
        finished = _search(model, state, n, width, bos, eos, pad, max_length, length_penalty, early_stopping)
    return _hypotheses(finished, num_return_sequences)


class _Ends:
    """Each item's ``width`` best complete hypotheses ``(N, width)``, best first, kept as back-pointers.

    A hypothesis ending at step ``t`` is the running beam ``parent`` of step ``t - 1`` followed by
    ``token`` (log-prob ``token_lp``): its earlier tokens are read back once, at the end
    (:meth:`_History.spell`), so no step copies whole token histories. The fields are packed in
    two tensors, so that merging two sets costs a fixed handful of operations: ``values`` (score,
    log_prob, token_lp) and ``code``, ``t * width * vocab + parent * vocab + token`` (the step's flat
    candidate index, offset by the step). A hypothesis ended with EOS exactly when its last token is
    EOS (running beams never hold one).
    """

    def __init__(self, values: torch.Tensor, code: torch.Tensor):
        self.values, self.code = values, code  # (3, N, K) floats, (N, K) int64

    @property
    def score(self) -> torch.Tensor:
        return self.values[0]

    @classmethod
    def empty(cls, batch: int, width: int, dtype: torch.dtype, device: torch.device) -> _Ends:
        return cls(
            torch.full((3, batch, width), -torch.inf, dtype=dtype, device=device),
            torch.zeros(batch, width, dtype=torch.long, device=device),
        )

    def merged_best(self, values: torch.Tensor, code: torch.Tensor, width: int) -> _Ends:
        """The ``width`` best by score of these and the candidates ``values``/``code``, per item, best first."""
        values, code = torch.cat([self.values, values], dim=2), torch.cat([self.code, code], dim=1)
        best = values[0].topk(width, dim=1).indices
        return _Ends(values.gather(2, best[None].expand(3, -1, -1)), code.gather(1, best))


class _History:
    """Per step, the running beams' flat candidate indices ``beam * vocab + token`` (``(N, width)``: beams
    index the previous step's) and their tokens' log-probs ``(N, width)``."""

    def __init__(self) -> None:
        self.choices: list[torch.Tensor] = []
        self.token_lps: list[torch.Tensor] = []

    def add(self, choice: torch.Tensor, token_lp: torch.Tensor) -> None:
        self.choices.append(choice)
        self.token_lps.append(token_lp)

    def spell(self, ends: _Ends, max_length: int, pad: int, eos: int, vocab: int) -> _Set:
        """The hypotheses ``ends`` with their whole token sequences, read back along the parents.

        A hypothesis ending at step ``s`` has tokens at positions ``< s`` from the history (its beam
        index stays put until the walk back reaches ``s - 1``) and its last token at ``s``; pad after.
        """
        score, log_prob, last_lp = ends.values.unbind(0)
        n, width = score.shape
        step, flat = ends.code.div(width * vocab, rounding_mode="floor"), ends.code.remainder(width * vocab)
        beam, last = flat.div(vocab, rounding_mode="floor"), flat.remainder(vocab)
        earlier = int(step.max())  # positions read from the history
        inside = step[:, :, None] > torch.arange(earlier, device=step.device)  # (N, width, earlier)
        choices_back, lps_back = [], []
        for position in range(earlier - 1, -1, -1):
            choice = self.choices[position].gather(1, beam)
            choices_back.append(choice)
            lps_back.append(self.token_lps[position].gather(1, beam))
            beam = torch.where(inside[:, :, position], choice.div(vocab, rounding_mode="floor"), beam)
        tokens = torch.full((n, width, max_length), pad, dtype=torch.long, device=score.device)
        token_lp = torch.zeros(n, width, max_length, dtype=score.dtype, device=score.device)
        if earlier:
            spelled = torch.stack(choices_back[::-1], dim=2).remainder(vocab)
            tokens[:, :, :earlier] = torch.where(inside, spelled, pad)
            token_lp[:, :, :earlier] = torch.where(inside, torch.stack(lps_back[::-1], dim=2), 0.0)
        tokens.scatter_(2, step[:, :, None], last[:, :, None])
        token_lp.scatter_(2, step[:, :, None], torch.where(torch.isfinite(score), last_lp, 0.0)[:, :, None])
        return _Set(score, log_prob, tokens, token_lp, step + 1, last == eos)


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
    """The step loop; returns each item's ``width`` best finished hypotheses (open beams finalised).

    Running beams all have the same length (the step count), so a step keeps only their summed
    log-probs and appends back-pointers to the history; whole sequences are spelled out once.
    Per step: one top-k over the ``width * vocab`` candidates, one stable sort of their EOS flags
    (the going beams: the best non-EOS), a handful of gathers; the candidates' token log-probs and
    the finished set are touched only when an EOS candidate beats an item's worst finished one. With
    one beam the state is never reordered (its only parent is itself).
    """
    rows = n * width
    device = state_device(state)
    tokens = torch.full((rows,), bos, dtype=torch.long, device=device)
    vocab: int | None = None
    log_prob = torch.zeros(0)
    ends: _Ends | None = None
    history = _History()
    done = torch.zeros(n, dtype=torch.bool, device=device)
    any_ended = any_done = False
    offsets = torch.arange(n, device=device).repeat_interleave(width) * width  # each row's item's first row
    reorder_rows = reorderer(model)
    for t in range(max_length):
        log_probs, state = _step(model, state, tokens, vocab, {"bos": bos, "eos": eos, "pad": pad})
        if vocab is None:
            vocab = log_probs.shape[1]
            dtype = accumulation_dtype(log_probs.dtype)
            log_prob = torch.full((n, width), -torch.inf, dtype=dtype, device=device)
            log_prob[:, 0] = 0.0  # one live beam at the start: the others would repeat it
            ends = _Ends.empty(n, width, dtype, device)
            worst = ends.score[:, -1:]  # (N, 1): what a new finished hypothesis must beat
            # candidates an EOS may finish: ranked inside the beam, of an item not done (updated with `done`)
            within = torch.arange(min(2 * width, width * vocab), device=device) < width
            eligible = within.expand(n, -1)
            flat = torch.arange(width * vocab, device=device)
            beam_token_of = torch.stack([flat // vocab, flat % vocab])  # a flat candidate index's beam and token
            is_eos_of = beam_token_of[1] == eos
            never = torch.tensor(-torch.inf, dtype=dtype, device=device)  # the score of what cannot finish
        assert ends is not None
        step_lp = log_probs.to(log_prob.dtype).view(n, width * vocab)
        cand = (log_prob[:, :, None] + step_lp.view(n, width, vocab)).view(n, width * vocab)
        top, index = cand.topk(min(2 * width, width * vocab), dim=1)
        is_eos = torch.take(is_eos_of, index)
        # an EOS candidate is finished if it ranks within the beam; done items take nothing more
        keep = is_eos & eligible  # (a -inf candidate kept scores -inf: never ranks)
        score = torch.where(keep, top / float(t + 1) ** penalty, never)
        if bool((score > worst).any()):  # only what beats an item's worst finished enters
            values = torch.stack([score, top, step_lp.gather(1, index)])
            ends, any_ended = ends.merged_best(values, index + t * width * vocab, width), True
            worst = ends.score[:, -1:]
        # the `width` best non-EOS candidates go on (a stable sort puts them first, in rank order): there
        # are always `width` of them, as each beam has one EOS among its V >= 2 tokens
        going = torch.sort(is_eos, dim=1, stable=True).indices[:, :width]
        choice = index.gather(1, going)
        log_prob = top.gather(1, going)
        history.add(choice, step_lp.gather(1, choice))
        parent, token = beam_token_of.index_select(1, choice.view(-1))
        if width > 1:
            state = reorder_rows(state, offsets + parent, rows)
        if t + 1 == max_length:
            break
        if any_ended or bool(torch.isneginf(log_prob[:, 0]).any()):
            done |= _done(early_stopping, worst[:, 0], log_prob[:, 0], t, max_length, penalty)  # beams rank-sorted
            any_done = bool(done.any())
            if any_done:
                if bool(done.all()):
                    return history.spell(ends, max_length, pad, eos, vocab)
                eligible = within & ~done[:, None]
                done_rows = done.repeat_interleave(width)
        tokens = torch.where(done_rows, pad, token) if any_done else token
    assert ends is not None and vocab is not None
    last = len(history.token_lps) - 1
    open_ = torch.isfinite(log_prob) & ~done[:, None]
    at_end = torch.where(open_, log_prob / float(last + 1) ** penalty, -torch.inf)
    values = torch.stack([at_end, log_prob, history.token_lps[last]])
    code = history.choices[last] + last * width * vocab
    return history.spell(ends.merged_best(values, code, width), max_length, pad, eos, vocab)


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
