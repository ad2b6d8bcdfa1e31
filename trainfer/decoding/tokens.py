"""A token table: class ids to strings, with the special ids a decoder needs, checked together."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from trainfer.decoding.checks import check_token_id
from trainfer.errors import DecodingError

MAX_TOKENS = 65536
"""The largest token table accepted."""


@dataclass(frozen=True)
class TokenTable:
    """Strings for the model's classes plus the special ids (each optional, each inside the table).

    Contract: ``tokens[i]`` is the text of class ``i``; the CTC ``blank`` and the autoregressive
    ``bos``/``eos``/``pad`` ids are special and print as nothing. ``blank`` must not name a label: its
    entry must be the empty string, and it must differ from ``eos`` and ``bos``. Labels are unique.
    """

    tokens: tuple[str, ...]
    blank: int | None = None
    bos: int | None = None
    eos: int | None = None
    pad: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.tokens, Sequence) or isinstance(self.tokens, str):
            raise DecodingError("tokens must be a sequence of strings")
        object.__setattr__(self, "tokens", tuple(self.tokens))
        if not 2 <= len(self.tokens) <= MAX_TOKENS:
            raise DecodingError(f"a token table holds 2 to {MAX_TOKENS} tokens, got {len(self.tokens)}")
        if not all(isinstance(t, str) for t in self.tokens):
            raise DecodingError("every token must be a string")
        for name in ("blank", "bos", "eos", "pad"):
            value = getattr(self, name)
            if value is not None:  # kept as an int (a NumPy integer scalar is taken as its value)
                object.__setattr__(self, name, check_token_id(name, value, len(self.tokens)))
        special = self.special_ids()
        labels = [t for i, t in enumerate(self.tokens) if i not in special]
        if len(set(labels)) != len(labels):
            raise DecodingError("token table labels must be unique")
        if self.blank is not None:
            if self.tokens[self.blank] != "":
                raise DecodingError(
                    f"blank id {self.blank} collides with the label {self.tokens[self.blank]!r} "
                    "(the blank's entry must be the empty string)"
                )
            if self.blank in (self.eos, self.bos):
                raise DecodingError(f"blank id {self.blank} collides with the bos/eos id")

    def special_ids(self) -> frozenset[int]:
        """The ids that are not labels: blank, bos, eos, pad."""
        return frozenset(i for i in (self.blank, self.bos, self.eos, self.pad) if i is not None)

    def text(self, ids: Sequence[int]) -> str:
        """The labels of ``ids`` joined, special ids dropped; an id outside the table is refused."""
        special = self.special_ids()
        out = []
        for i in ids:
            check_token_id("token", i, len(self.tokens))
            if i not in special:
                out.append(self.tokens[i])
        return "".join(out)
