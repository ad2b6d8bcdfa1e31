"""Many threads started together against single-threaded answers (the thread-safety tests' harness).

Importable as ``threads`` from the tests (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

LIMIT_S = 120


def hammer(call: Callable[[Any], Any], inputs: Sequence[Any], calls: int = 50, limit_s: float = LIMIT_S) -> list[list]:
    """``call(inputs[i])`` ``calls`` times in thread ``i``, one thread per input, all started at a barrier.

    Every thread must finish within ``limit_s`` (a hang fails) and none may raise (the first
    error is re-raised in the test thread). Returns each thread's results, in call order.
    """
    barrier = threading.Barrier(len(inputs))
    results: list[list] = [[] for _ in inputs]
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            barrier.wait(limit_s)
            for _ in range(calls):
                results[index].append(call(inputs[index]))
        except BaseException as error:  # noqa: BLE001 - reported by the test thread
            errors.append(error)

    workers = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(inputs))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(limit_s)
    assert not any(worker.is_alive() for worker in workers), f"threads still running after {limit_s}s"
    assert not errors, repr(errors[0])
    return results


def thread_inputs(
    threads: int, batch: int = 4, shape: tuple[int, ...] = (1, 8, 8), seed: int = 7
) -> list[torch.Tensor]:
    """One distinct random batch per thread."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, *shape, generator=generator) for _ in range(threads)]


def probabilities(results) -> np.ndarray:
    """(N, classes) probabilities by label of classification results (``top_k`` = all classes)."""
    return np.array([[p for _, p in sorted(r.top_k)] for r in results])


def state(model: nn.Module) -> dict[str, Tensor]:
    """A copy of every weight and buffer."""
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, Tensor]) -> None:
    """Weights and buffers bit-identical to ``before`` (:func:`state`)."""
    after = model.state_dict()
    changed = [name for name, tensor in before.items() if not torch.equal(after[name], tensor)]
    assert not changed, f"changed by prediction: {changed}"
