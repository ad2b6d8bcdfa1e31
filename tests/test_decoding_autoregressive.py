"""Autoregressive greedy and beam search: HF generate semantics, known pitfalls, proofs by exhaustion."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.decoding_models import TableModel, exhaustive, random_table
from trainfer import decoding
from trainfer.errors import DecodingError, TrainferError

EXHAUSTION_EXAMPLES = 60
BOS = 0  # the tables' start token; EOS is drawn per example


def _search(model, items, **kw):
    return decoding.beam_search(model, torch.arange(items), bos=BOS, **kw)


@settings(max_examples=EXHAUSTION_EXAMPLES)
@given(
    vocab=st.integers(2, 4),
    max_length=st.integers(1, 4),
    items=st.integers(1, 3),
    penalty=st.sampled_from([-1.0, 0.0, 0.5, 1.0, 2.0]),
    early=st.sampled_from([True, False, "never"]),
    seed=st.integers(0, 2**31),
)
def test_a_beam_as_wide_as_the_search_space_is_exhaustive_enumeration(vocab, max_length, items, penalty, early, seed):
    eos = vocab - 1
    model = TableModel(random_table(items, vocab, max_length, seed))
    width = vocab**max_length  # at least every complete sequence: nothing is ever pruned
    found = _search(
        model,
        items,
        eos=eos,
        max_length=max_length,
        num_beams=width,
        length_penalty=penalty,
        early_stopping=early,
        num_return_sequences=width,
    )
    for item, hyps in enumerate(found):
        truth = exhaustive(model, item, BOS, eos, max_length, penalty)
        assert len(hyps) == len(truth)
        for hyp, (score, tokens, ended) in zip(hyps, truth):
            assert hyp.score == pytest.approx(score, rel=1e-9, abs=1e-12)
            assert (hyp.tokens, hyp.finished) == (tokens, ended)
            seq = tokens + ((eos,) if ended else ())
            assert hyp.log_prob == pytest.approx(model.log_prob(item, BOS, seq), rel=1e-9, abs=1e-12)
            assert sum(hyp.token_log_probs) == pytest.approx(model.log_prob(item, BOS, tokens), rel=1e-9, abs=1e-12)


@settings(max_examples=EXHAUSTION_EXAMPLES)
@given(
    vocab=st.integers(3, 5),
    max_length=st.integers(2, 5),
    items=st.integers(1, 4),
    width=st.integers(2, 4),
    penalty=st.sampled_from([-1.0, 0.5, 1.0]),
    seed=st.integers(0, 2**31),
)
def test_narrow_beams_score_each_hypothesis_by_its_own_length(vocab, max_length, items, width, penalty, seed):
    """Returned hypotheses are sorted, never hold EOS, and score their own log-prob over their own length."""
    eos = 1
    model = TableModel(random_table(items, vocab, max_length, seed))
    found = _search(
        model,
        items,
        eos=eos,
        max_length=max_length,
        num_beams=width,
        length_penalty=penalty,
        early_stopping="never",
        num_return_sequences=width,
    )
    for item, hyps in enumerate(found):
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        for h in hyps:
            seq = h.tokens + ((eos,) if h.finished else ())
            assert eos not in h.tokens and len(seq) <= max_length
            assert h.score == pytest.approx(model.log_prob(item, BOS, seq) / len(seq) ** penalty, rel=1e-9)


@settings(max_examples=EXHAUSTION_EXAMPLES)
@given(
    vocab=st.integers(2, 5),
    max_length=st.integers(1, 5),
    items=st.integers(1, 4),
    penalty=st.sampled_from([0.0, 1.0]),
    seed=st.integers(0, 2**31),
)
def test_greedy_is_beam_width_one(vocab, max_length, items, penalty, seed):
    model = TableModel(random_table(items, vocab, max_length, seed))
    kw = dict(eos=vocab - 1, max_length=max_length, length_penalty=penalty)
    greedy = decoding.greedy_search(model, torch.arange(items), bos=BOS, **kw)
    beam = _search(model, items, num_beams=1, early_stopping=True, **kw)
    for g, (b,) in zip(greedy, beam):
        assert (g.tokens, g.finished) == (b.tokens, b.finished)
        assert g.score == pytest.approx(b.score, rel=1e-12) and g.log_prob == pytest.approx(b.log_prob, rel=1e-12)
        assert g.token_log_probs == pytest.approx(b.token_log_probs, rel=1e-12)


@pytest.mark.parametrize("early", [True, False, "never"])
@pytest.mark.parametrize("width", [1, 3])
def test_results_do_not_depend_on_batch_composition(early, width):
    items, vocab, max_length = 6, 5, 5
    table = random_table(items, vocab, max_length, seed=7)
    table[0, :, 1] = 0.0  # item 0 ends at once (EOS id 1 certain): it must not end the others
    table[0, :, [0, 2, 3, 4]] = -torch.inf
    model = TableModel(table)
    kw = dict(eos=1, max_length=max_length, num_beams=width, early_stopping=early, num_return_sequences=width)
    batched = _search(model, items, **kw)
    for item in range(items):
        alone = decoding.beam_search(model, torch.tensor([item]), bos=BOS, **kw)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in batched[item]]
        assert [h.score for h in alone] == pytest.approx([h.score for h in batched[item]], rel=1e-12)
    flipped = decoding.beam_search(model, torch.arange(items).flip(0), bos=BOS, **kw)
    assert [[h.tokens for h in r] for r in flipped[::-1]] == [[h.tokens for h in r] for r in batched]


def test_length_penalty_uses_each_hypothesis_own_length():
    # stop at once: log-prob -1.0, length 1 (score -1.0); go on "2 2 2" then stop: -2.0, length 4 (score -0.5).
    # Own lengths (alpha = 1) pick the long one; the padded length 4 for both would pick the short one.
    vocab, eos, label = 3, 1, 2
    table = torch.full((1, 4**5, vocab), math.log(0.5), dtype=torch.float64)
    table[..., BOS] = -torch.inf
    model = TableModel(table)
    a = (-2.0 - math.log1p(-math.exp(-1.0))) / 2  # the two middle steps' log-prob each

    def set_row(fed, stop, go):
        table[0, model.code(fed), eos], table[0, model.code(fed), label] = stop, go

    set_row((BOS,), -1.0, math.log1p(-math.exp(-1.0)))
    set_row((BOS, 2), math.log1p(-math.exp(a)), a)
    set_row((BOS, 2, 2), math.log1p(-math.exp(a)), a)
    set_row((BOS, 2, 2, 2), 0.0, -torch.inf)
    # "never": HF's heuristic (False) stops once "2 2 2" at its current length 3 scores below "2 2 <eos>"
    (hyps,) = _search(
        model, 1, eos=eos, max_length=6, num_beams=2, length_penalty=1.0, num_return_sequences=2, early_stopping="never"
    )
    assert hyps[0].tokens == (2, 2, 2) and hyps[0].finished
    assert hyps[0].log_prob == pytest.approx(-2.0, rel=1e-12) and hyps[0].score == pytest.approx(-0.5, rel=1e-12)
    for h in hyps:
        assert h.score == pytest.approx(h.log_prob / (len(h.tokens) + h.finished), rel=1e-12)


def test_no_expansion_after_eos():
    items, vocab, eos, pad = 3, 5, 1, 4
    table = random_table(items, vocab, 6, seed=3)
    table[..., eos] += 1.5  # EOS common
    model = TableModel(table.log_softmax(dim=2), forbid_eos_input=eos)
    found = _search(model, items, eos=eos, pad=pad, max_length=6, num_beams=3, num_return_sequences=3)
    assert all(eos not in h.tokens for row in found for h in row)
    assert len(model.fed) >= 2


def test_eos_on_the_first_step():
    table = random_table(2, 4, 3, seed=1)
    table[:, :, 1] = 0.0  # EOS certain everywhere
    table[:, :, [0, 2, 3]] = -torch.inf
    model = TableModel(table)
    for early in (True, False, "never"):
        found = _search(model, 2, eos=1, max_length=3, num_beams=3, early_stopping=early, num_return_sequences=1)
        assert [h.tokens for (h,) in found] == [(), ()]
        assert all(h.finished and h.score == 0.0 for (h,) in found)
    (g, _) = decoding.greedy_search(model, torch.arange(2), bos=BOS, eos=1, max_length=3)
    assert g.tokens == () and g.finished


def test_n_best_at_max_length_when_nothing_ends():
    table = random_table(2, 4, 4, seed=5)
    table[:, :, 1] = -torch.inf  # EOS impossible: every hypothesis is cut at max_length
    model = TableModel(table)
    found = _search(model, 2, eos=1, max_length=4, num_beams=4, num_return_sequences=4)
    for item, hyps in enumerate(found):
        assert len(hyps) == 4 and len({h.tokens for h in hyps}) == 4
        assert all(len(h.tokens) == 4 and not h.finished for h in hyps)
        truth = [r for r in exhaustive(model, item, BOS, 1, 4, 1.0)][:1]
        assert hyps[0].tokens == truth[0][1]


class _GRUModel(torch.nn.Module):
    """A user's GRU decoder: state (rows, hidden) plus encoder memory, reordered automatically."""

    def __init__(self, vocab=6, hidden=8):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.cell = torch.nn.GRUCell(hidden, hidden)
        self.out = torch.nn.Linear(2 * hidden, vocab)

    def encode(self, x):
        return (torch.tanh(x), {"memory": x})

    def step(self, state, tokens):
        h, extra = state
        h = self.cell(self.embed(tokens), h)
        return self.out(torch.cat([h, extra["memory"]], 1)).log_softmax(-1), (h, extra)


def test_a_plain_gru_decoder_plugs_in_and_batching_agrees():
    torch.manual_seed(0)
    model = _GRUModel().double()
    x = torch.randn(5, 8, dtype=torch.float64)
    kw = dict(bos=0, eos=1, max_length=7, num_beams=4, num_return_sequences=2)
    batched = decoding.beam_search(model, x, **kw)
    for i in range(5):
        alone = decoding.beam_search(model, x[i : i + 1], **kw)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in batched[i]]
        assert [h.score for h in alone] == pytest.approx([h.score for h in batched[i]], rel=1e-9)


class _BadStep(_GRUModel):
    def step(self, state, tokens):
        lp, state = super().step(state, tokens)
        return lp[:, :-1] if tokens[0] != 0 else lp, state


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(max_length=0), "max_length"),
        (dict(num_beams=0), "num_beams"),
        (dict(num_beams=decoding.MAX_BEAM_WIDTH + 1), "num_beams"),
        (dict(num_return_sequences=5), "num_return_sequences"),
        (dict(eos=9), "eos id 9 is outside"),
        (dict(early_stopping="sometimes"), "early_stopping"),
        (dict(length_penalty=float("nan")), "length_penalty"),
        (dict(length_penalty=1e300), r"length_penalty must be in \[-10, 10\], got 1e\+300"),  # was OverflowError
        (dict(length_penalty=-10.5), "length_penalty must be in"),
        (dict(bos=99), "fed bos=99: IndexError"),  # was a bare IndexError from the model's embedding
    ],
)
def test_bad_settings_are_refused_clearly(kwargs, match):
    kw = dict(bos=0, eos=1, max_length=4, num_beams=4) | kwargs
    with pytest.raises(DecodingError, match=match) as info:
        decoding.beam_search(_GRUModel(), torch.randn(2, 8), **kw)
    assert isinstance(info.value, TrainferError)


def test_bos_eos_and_pad_may_be_numpy_integer_scalars_but_not_booleans():
    """Token ids read from NumPy (``np.int64``, ``np.uint64``) are their values: the same hypotheses as Python ints."""
    model, x, kw = _GRUModel(), torch.randn(2, 8), dict(max_length=4, num_beams=3)
    expected = decoding.beam_search(model, x, bos=0, eos=1, pad=2, **kw)
    got = decoding.beam_search(model, x, bos=np.int64(0), eos=np.uint64(1), pad=np.int32(2), **kw)
    assert [[h.tokens for h in item] for item in got] == [[h.tokens for h in item] for item in expected]
    greedy = decoding.greedy_search(model, x, bos=0, eos=1, max_length=4)
    assert decoding.greedy_search(model, x, bos=np.uint8(0), eos=np.int16(1), max_length=4) == greedy
    with pytest.raises(DecodingError, match="^eos must be an int, got bool$"):
        decoding.greedy_search(_GRUModel(), torch.randn(2, 8), bos=0, eos=np.bool_(True), max_length=4)


def test_a_step_of_the_wrong_shape_is_refused():
    with pytest.raises(DecodingError, match=r"step\(\)'s log_probs must have shape \(8, 6\), got \(8, 5\)"):
        decoding.beam_search(_BadStep(), torch.randn(2, 8), bos=0, eos=1, max_length=4, num_beams=4)
    with pytest.raises(DecodingError, match="rows"):
        decoding.beam_search(_BadState(), torch.randn(2, 8), bos=0, eos=1, max_length=4, num_beams=4)


class _BadState(_GRUModel):
    def encode(self, x):
        return (torch.tanh(x)[None], {"memory": x})  # (layers, rows, hidden): not rows first


class _PoisonedStep(_GRUModel):
    """Puts ``value`` at one (row, token) of the log-probs at step ``at``: a single entry, anywhere."""

    def __init__(self, value, at, row, token):
        super().__init__()
        self.value, self.at, self.row, self.token, self.calls = value, at, row, token, 0

    def step(self, state, tokens):
        lp, state = super().step(state, tokens)
        if self.calls == self.at:
            lp = lp.clone()
            lp[self.row, self.token] = self.value
        self.calls += 1
        return lp, state


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize(("at", "row", "token"), [(0, 0, 0), (0, 7, 5), (2, 3, 1), (2, 5, 4)])
@pytest.mark.parametrize("num_beams", [1, 4])
def test_nan_or_plus_inf_in_a_step_is_refused(value, at, row, token, num_beams):
    """Even in a row of a beam not yet live (rows 1-3 at step 0) or of a token never chosen."""
    torch.manual_seed(0)
    model = _PoisonedStep(value, at, row if num_beams == 4 else row % 2, token)
    with pytest.raises(DecodingError, match=r"step\(\)'s log_probs holds NaN or \+inf"):
        decoding.beam_search(model, torch.randn(2, 8), bos=0, eos=1, max_length=4, num_beams=num_beams)
    model.calls, model.row = 0, row % 2  # greedy: one row per item
    with pytest.raises(DecodingError, match=r"step\(\)'s log_probs holds NaN or \+inf"):
        decoding.greedy_search(model, torch.randn(2, 8), bos=0, eos=1, max_length=4)


class _ConstantStep(_GRUModel):
    """Every step's log-probs replaced by ``fill`` (a model that forbids every token, or forgot log_softmax)."""

    def __init__(self, fill):
        super().__init__()
        self.fill = fill

    def step(self, state, tokens):
        lp, state = super().step(state, tokens)
        return self.fill(lp), state


def _both_searches(model, inputs, **kw):
    """beam_search's and greedy_search's answers (or errors) for the same model and inputs."""
    for search in (decoding.beam_search, decoding.greedy_search):
        options = dict(bos=0, eos=1, max_length=4) | ({"num_beams": 2} if search is decoding.beam_search else {})
        yield functools.partial(search, model, inputs, **options | kw)


def test_items_no_sequence_is_possible_for_are_one_clear_error_in_every_search():
    """Attacker round 7: all -inf steps gave greedy an IndexError, beam search empty lists."""
    model = _ConstantStep(lambda lp: torch.full_like(lp, -torch.inf))
    for run in _both_searches(model, torch.randn(3, 8)):
        with pytest.raises(DecodingError, match=r"item\(s\) \[0, 1, 2\] no sequence of finite log-probability"):
            run()


def _peak_at(top):
    """Log-probs shifted so that each row's largest is ``top``: 0 for a true log-softmax."""
    return _ConstantStep(lambda lp: lp - lp.max(1, keepdim=True).values + top)


def test_scores_above_zero_are_refused_as_not_log_probabilities():
    """Raw logits passed where log_softmax(logits) was meant: refused, not ranked."""
    for run in _both_searches(_peak_at(0.5), torch.randn(2, 8)):
        with pytest.raises(DecodingError, match=r"log_probs holds 0.5 > 0: .*pass log_softmax\(logits\)"):
            run()
    for run in _both_searches(_peak_at(decoding.LOG_PROB_SLACK / 2), torch.randn(2, 8)):
        assert len(run()) == 2  # rounding just above 0 is accepted


def test_an_empty_batch_is_refused_by_name():
    for run in _both_searches(_GRUModel(), torch.randn(0, 8)):
        with pytest.raises(DecodingError, match="inputs must hold at least one item to decode, got a batch of 0"):
            run()
