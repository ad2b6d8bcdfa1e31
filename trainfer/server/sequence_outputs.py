"""The protocol outputs of decoded sequences: what ``/infer`` returns for a ``sequence`` model.

=============  ========  ==========  =================================================================
name           datatype  shape       content
=============  ========  ==========  =================================================================
``text``       BYTES     ``(N,)``    the decoded text (UTF-8), as ``SequenceResult.text``
``tokens``     INT64     ``(N, L)``  the token ids, padded with :data:`PAD` (``-1``) to the longest of
                                     the request (``L`` may be 0: every row empty)
``lengths``    INT64     ``(N,)``    the number of tokens of each row (its ids are ``tokens[i, :n]``)
``score``      FP64      ``(N,)``    the score the search ranked by (``SequenceResult.score``)
``finished``   BOOL      ``(N,)``    autoregressive only: ended by EOS (False: cut at ``max_length``)
=============  ========  ==========  =================================================================

A CTC model also keeps its per-frame log-probabilities, ``values`` FP32 ``(N, T, C)``
(:class:`~trainfer.server.model.ServedModel`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from trainfer.serve.sequence import SequenceResult

#: The id padding ``tokens`` beyond each row's length (never a token id: ids are >= 0).
PAD = -1
#: Outputs whose dimensions after the batch vary from request to request (-1 in the metadata).
VARIABLE = frozenset({"tokens"})

__all__ = ["PAD", "VARIABLE", "sequence_tensors"]


def sequence_tensors(results: Sequence[SequenceResult], autoregressive: bool) -> dict[str, np.ndarray]:
    """The protocol tensors of one request's decoded ``results`` (see the module docstring)."""
    lengths = np.array([len(r.tokens) for r in results], dtype=np.int64)
    tokens = np.full((len(results), int(lengths.max(initial=0))), PAD, dtype=np.int64)
    for row, result in enumerate(results):
        tokens[row, : len(result.tokens)] = result.tokens
    tensors = {
        "text": np.array([r.text.encode() for r in results], dtype=object),
        "tokens": tokens,
        "lengths": lengths,
        "score": np.array([r.score for r in results], dtype=np.float64),
    }
    if autoregressive:
        tensors["finished"] = np.array([bool(r.finished) for r in results], dtype=np.bool_)
    return tensors
