"""Test models for the autoregressive searches: next-token log-probs read from random tables."""

from __future__ import annotations

import itertools
import math

import torch


class TableModel:
    """log P(next | item, prefix) from a table indexed by the item and a code of the whole prefix.

    The code of a prefix (bos included) is unique (base V+1 digits), so scores depend on the full
    history: greedy is not optimal, and only a search wide enough finds the best sequence.
    """

    def __init__(self, table: torch.Tensor, forbid_eos_input: int | None = None):
        self.table = table  # (N, codes, V) log-probs
        self.vocab = table.shape[2]
        self.forbid = forbid_eos_input
        self.fed: list[torch.Tensor] = []

    def encode(self, items: torch.Tensor) -> torch.Tensor:
        return torch.stack([items, torch.zeros_like(items)], dim=1)  # rows: (item, prefix code)

    def step(self, state: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.fed.append(tokens.clone())
        if self.forbid is not None:
            assert not bool((tokens == self.forbid).any()), "a finished hypothesis was expanded"
        code = state[:, 1] * (self.vocab + 1) + tokens + 1
        return self.table[state[:, 0], code], torch.stack([state[:, 0], code], dim=1)

    def code(self, fed: tuple[int, ...]) -> int:
        """The table row read after feeding ``fed`` (bos first)."""
        code = 0
        for tok in fed:
            code = code * (self.vocab + 1) + tok + 1
        return code

    def log_prob(self, item: int, bos: int, seq: tuple[int, ...]) -> float:
        """The log-probability of ``seq`` (generated tokens, EOS included when present), in Python."""
        code, total = 0, 0.0
        for prev, tok in zip((bos,) + seq[:-1], seq):
            code = code * (self.vocab + 1) + prev + 1
            total += float(self.table[item, code, tok])
        return total


def random_table(items: int, vocab: int, max_length: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """Random normalised log-probs for every prefix code up to ``max_length`` steps."""
    codes = (vocab + 1) ** (max_length + 1)
    gen = torch.Generator().manual_seed(seed)
    return (2.0 * torch.randn(items, codes, vocab, generator=gen, dtype=dtype)).log_softmax(dim=2)


def exhaustive(model: TableModel, item: int, bos: int, eos: int, max_length: int, penalty: float):
    """Every complete sequence (ended by EOS, or cut at max_length): (score, tokens without EOS, ended)."""
    out = []
    labels = [v for v in range(model.vocab) if v != eos]
    for n in range(max_length + 1):
        for body in itertools.product(labels, repeat=n):
            if n < max_length:
                seq, ended = body + (eos,), True
            else:
                seq, ended = body, False
            if len(seq) > max_length:
                continue
            lp = model.log_prob(item, bos, seq)
            if lp > -math.inf:
                out.append((lp / len(seq) ** penalty, body, ended))
    out.sort(key=lambda r: -r[0])
    return out
