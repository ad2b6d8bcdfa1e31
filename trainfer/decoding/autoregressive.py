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

Everything per step is a fixed number of array operations over ``(N, num_beams, ...)``: torch for
what scales with the vocabulary (the candidates' sum and top-k) and the state's reorder, NumPy on
the host for the bookkeeping of the ``(N, 2 * num_beams)`` ranked candidates (on an accelerator,
a few small copies per step). Step log-probs holding NaN or +inf are refused (beam search finds
them in the top-k, where they rank first).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from trainfer.decoding.checks import (
    MAX_LENGTH,
    MAX_LENGTH_PENALTY,
    accumulation_dtype,
    check_at_most_zero,
    check_beam_width,
    check_finite_float,
    check_int,
    check_items,
    check_scores,
    check_token_id,
    refuse_impossible,
    refuse_not_log_probs,
)
from trainfer.decoding.hypothesis import Hypothesis
from trainfer.decoding.interface import batch_size, reorder, reorderer, state_device
from trainfer.errors import DecodingError


@dataclass
class _Set:
    """Hypotheses of every item, ``(N, K, ...)``: score, summed log-prob, tokens, their log-probs, length, ended.

    Tensors (greedy search) or NumPy arrays (beam search's bookkeeping, on the host).
    """

    score: torch.Tensor | np.ndarray
    log_prob: torch.Tensor | np.ndarray
    tokens: torch.Tensor | np.ndarray
    token_lp: torch.Tensor | np.ndarray
    length: torch.Tensor | np.ndarray
    ended: torch.Tensor | np.ndarray


def _check_settings(
    bos: int, eos: int, pad: int | None, max_length: int, length_penalty: float
) -> tuple[int, int, int]:
    """Checks the settings that do not need the vocabulary; returns the bos, eos and pad ids as ``int`` (pad: eos
    when None)."""
    check_int("max_length", max_length, 1, MAX_LENGTH)
    check_finite_float("length_penalty", length_penalty, MAX_LENGTH_PENALTY)
    bos, eos = check_int("bos", bos, 0, 2**62), check_int("eos", eos, 0, 2**62)
    return bos, eos, eos if pad is None else check_int("pad", pad, 0, 2**62)


_STEP_LOG_PROBS = "step()'s log_probs"


def _step(
    model: Any, state: Any, tokens: torch.Tensor, vocab: int | None, ids: dict[str, int], values: bool = True
) -> tuple[torch.Tensor, Any]:
    """One model step, its log-probs checked: ``(rows, V)`` with V the same every step and >= 2, and
    (``values``) no NaN or +inf (else the caller checks that)."""
    rows = tokens.shape[0]
    try:
        log_probs, state = model.step(state, tokens)
    except IndexError as error:  # the first step, fed bos, is where the vocabulary is not known yet
        if vocab is not None:
            raise
        raise DecodingError(
            f"step() failed on the first step, fed bos={ids['bos']}: {type(error).__name__}: {error}; "
            "bos must be a token id of the model's vocabulary"
        ) from error
    log_probs = check_scores(log_probs, _STEP_LOG_PROBS, (rows, vocab), values)
    check_at_most_zero(log_probs, _STEP_LOG_PROBS)
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
    return state, check_items(batch_size(state), "inputs")


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
    bos, eos, pad = _check_settings(bos, eos, pad, max_length, length_penalty)
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
    early_stopping: bool | str, worst: np.ndarray, best: np.ndarray, t: int, max_length: int, penalty: float
) -> np.ndarray:
    """Items whose finished hypotheses can no longer be displaced (see the module docstring).

    ``worst``: the last (worst) of each item's finished scores, kept best first (so the set is full
    when it is finite); ``best``: each item's best running log-prob. ``worst >= bound`` says both
    "full and not beatable" and, where ``best`` is -inf (the bound too), "nothing left running".
    """
    if early_stopping is True:
        return np.isfinite(worst)
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
    bos, eos, pad = _check_settings(bos, eos, pad, max_length, length_penalty)
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
    """Each item's ``width`` best complete hypotheses, best first, kept as back-pointers.

    A hypothesis ending at step ``t`` is the running beam ``parent`` of step ``t - 1`` followed by
    ``token`` (log-prob ``token_lp``): its earlier tokens are read back once, at the end
    (:meth:`_History.spell`), so no step copies whole token histories. The fields are packed in one
    float64 array ``(N, 2 * width, 4)`` of (score, log_prob, token_lp, code): the set in its first
    ``width`` columns, room for ``width`` candidates after them, so that a merge writes the candidates
    in place, sorts once and gathers once. ``code`` is ``t * width * vocab + parent * vocab + token``
    (the step's flat candidate index, offset by the step), exact in float64 (below
    ``MAX_LENGTH * MAX_BEAM_WIDTH * vocab < 2**53``), as are float32 and float64 scores. A
    hypothesis ended with EOS exactly when its last token is EOS (running beams never hold one).
    """

    def __init__(self, batch: int, width: int):
        self.width = width
        self.packed = np.full((batch, 2 * width, 4), -np.inf)
        self.packed[:, :, 3] = 0.0
        self.worst = self.packed[:, width - 1 : width, 0]  # (N, 1): what a new one must beat (a live view)
        self._items = np.arange(batch)[:, None]

    def merge(self, score: np.ndarray, log_prob: np.ndarray, token_lp: np.ndarray, code: np.ndarray) -> None:
        """Keeps the ``width`` best by score of the set and the ``(N, width)`` candidates, per item, best first.

        Equal scores keep their order: the set's before the candidates, candidates by rank.
        """
        room = self.packed[:, self.width :]
        room[:, :, 0], room[:, :, 1], room[:, :, 2], room[:, :, 3] = score, log_prob, token_lp, code
        best = (-self.packed[:, :, 0]).argsort(axis=1, kind="stable")[:, : self.width]
        self.packed[:, : self.width] = self.packed[self._items, best]


class _History:
    """Per step, the running beams' flat candidate indices ``beam * vocab + token`` (``(N, width)``: beams
    index the previous step's) and their tokens' log-probs ``(N, width)``, as NumPy arrays."""

    def __init__(self) -> None:
        self.choices: list[np.ndarray] = []
        self.token_lps: list[np.ndarray] = []

    def add(self, choice: np.ndarray, token_lp: np.ndarray) -> None:
        self.choices.append(choice)
        self.token_lps.append(token_lp)

    def spell(self, ends: _Ends, max_length: int, pad: int, eos: int, vocab: int, dtype: np.dtype) -> _Set:
        """The hypotheses ``ends`` with their whole token sequences, read back along the parents.

        A hypothesis ending at step ``s`` has tokens at positions ``< s`` from the history (its beam
        index stays put until the walk back reaches ``s - 1``) and its last token at ``s``; pad after.
        Scores and log-probs come back in ``dtype`` (the search's accumulation dtype).
        """
        found = ends.packed[:, : ends.width]
        score, log_prob, last_lp = (found[:, :, i].astype(dtype) for i in range(3))
        n, width = score.shape
        step, flat = np.divmod(found[:, :, 3].astype(np.int64), width * vocab)
        beam, last = np.divmod(flat, vocab)
        earlier = int(step.max())  # positions read from the history
        inside = step[:, :, None] > np.arange(earlier)  # (N, width, earlier)
        items = np.arange(n)[:, None]
        choices = np.zeros((n, width, earlier), dtype=np.int64)
        lps = np.zeros((n, width, earlier), dtype=score.dtype)
        for position in range(earlier - 1, -1, -1):
            choices[:, :, position] = choice = self.choices[position][items, beam]
            lps[:, :, position] = self.token_lps[position][items, beam]
            beam = np.where(inside[:, :, position], choice // vocab, beam)
        tokens = np.full((n, width, max_length), pad, dtype=np.int64)
        token_lp = np.zeros((n, width, max_length), dtype=score.dtype)
        tokens[:, :, :earlier] = np.where(inside, choices % vocab, pad)
        token_lp[:, :, :earlier] = np.where(inside, lps, 0.0)
        hyps = np.arange(width)[None, :]
        tokens[items, hyps, step] = last
        token_lp[items, hyps, step] = np.where(np.isfinite(score), last_lp, 0.0)
        return _Set(score, log_prob, tokens, token_lp, step + 1, last == eos)


def _host(tensor: torch.Tensor) -> np.ndarray:
    """A tensor as a NumPy array (no copy on the CPU)."""
    return tensor.numpy() if tensor.device.type == "cpu" else tensor.cpu().numpy()


def _device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A NumPy array as a tensor on ``device`` (no copy on the CPU)."""
    tensor = torch.from_numpy(array)
    return tensor if device.type == "cpu" else tensor.to(device)


def _candidate_lps(step_lp: torch.Tensor, index: torch.Tensor, flat: np.ndarray) -> np.ndarray:
    """The token log-probs ``(N, K)`` of the ranked candidates: ``index`` (per item, over ``width * vocab``)
    or, the same, ``flat`` (over all of ``step_lp``)."""
    if step_lp.device.type == "cpu":
        return step_lp.detach().numpy().take(flat)
    return _host(step_lp.gather(1, index))


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
    Per step, torch does what scales with the vocabulary: the candidates' log-probs (one addition),
    one top-k over the ``width * vocab`` candidates, and the state's reorder. The rest works on the
    ``(N, 2 * width)`` ranked candidates, tiny arrays, in NumPy on the host (a NumPy operation on a
    tiny array costs a fraction of a torch dispatch): the EOS flags (a table), the going beams (a
    stable sort of those flags: the best non-EOS, in rank order), the finished set (merged only when
    an EOS candidate beats an item's worst finished one), the done flags and the history. With one
    beam the state is never reordered (its only parent is itself).
    """
    rows = n * width
    device = state_device(state)
    ids = {"bos": bos, "eos": eos, "pad": pad}
    log_probs, state = _step(model, state, torch.full((rows,), bos, dtype=torch.long, device=device), None, ids, False)
    vocab = log_probs.shape[1]
    dtype = accumulation_dtype(log_probs.dtype)
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    running = np.full((n, width), -np.inf, dtype=np_dtype)  # the going beams' summed log-probs
    running[:, 0] = 0.0  # one live beam at the start: the others would repeat it
    ranked = min(2 * width, width * vocab)  # candidates ranked per item and step
    ends = _Ends(n, width)
    live = np.ones((n, 1), dtype=bool)  # items not done: their EOS candidates may finish
    is_eos_of = np.arange(width * vocab) % vocab == eos  # a flat candidate index's EOS flag
    items = np.arange(n)[:, None]
    offsets, rank_base, lp_base = items * width, items * ranked, items * (width * vocab)  # flat offsets per item
    history = _History()
    done = np.zeros(n, dtype=bool)
    any_ended = any_done = False
    reorder_rows = reorderer(model)
    for t in range(max_length):
        step_lp = (log_probs if log_probs.dtype == dtype else log_probs.to(dtype)).view(n, width * vocab)
        cand = _device(running.reshape(n, width, 1), step_lp.device) + step_lp.view(n, width, vocab)
        top_t, index_t = cand.view(n, width * vocab).topk(ranked, dim=1)
        top, index = _host(top_t), _host(index_t)
        if not (top[:, 0] < np.inf).all():  # NaN and +inf rank first (any in the step's output reach `top`)
            refuse_not_log_probs(_STEP_LOG_PROBS)
        cand_lp = _candidate_lps(step_lp, index_t, index + lp_base)
        is_eos = is_eos_of.take(index)
        # an EOS candidate is finished if it ranks within the beam (the first `width`); done items take
        # nothing more; -inf never ranks
        score = np.where(is_eos[:, :width] & live, top[:, :width] / float(t + 1) ** penalty, -np.inf)
        if (score > ends.worst).any():  # only what beats an item's worst finished enters
            ends.merge(score, top[:, :width], cand_lp[:, :width], index[:, :width] + t * width * vocab)
            any_ended = True
        # the `width` best non-EOS candidates go on (a stable sort puts them first, in rank order): there
        # are always `width` of them, as each beam has one EOS among its V >= 2 tokens
        going = is_eos.argsort(axis=1, kind="stable")[:, :width] + rank_base
        choice, running = index.take(going), top.take(going)
        history.add(choice, cand_lp.take(going))
        parent, token = np.divmod(choice, vocab)
        if width > 1:
            state = reorder_rows(state, _device((offsets + parent).reshape(rows), device), rows)
        if t + 1 == max_length:
            break
        if any_ended or (running[:, 0] == -np.inf).any():
            done |= _done(early_stopping, ends.worst[:, 0], running[:, 0], t, max_length, penalty)  # beams rank-sorted
            any_done = bool(done.any())
            if any_done:
                if done.all():
                    return history.spell(ends, max_length, pad, eos, vocab, np_dtype)
                live = ~done[:, None]
        if any_done:
            token = np.where(done[:, None], pad, token)
        log_probs, state = _step(model, state, _device(token.reshape(rows), device), vocab, ids, False)
    last = len(history.token_lps) - 1
    open_ = np.isfinite(running) & ~done[:, None]
    at_end = np.where(open_, running / float(last + 1) ** penalty, -np.inf)
    ends.merge(at_end, running, history.token_lps[last], history.choices[last] + last * width * vocab)
    return history.spell(ends, max_length, pad, eos, vocab, np_dtype)


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
    impossible = [i for i, row in enumerate(out) if not row]
    if impossible:
        refuse_impossible(impossible, _STEP_LOG_PROBS)
    return out
