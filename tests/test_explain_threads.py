"""Explaining with a Predictor that other threads are predicting with (attack round 8, finding 1).

docs/serving.md ("Sharing a Predictor between threads"): one Predictor may be called from any number
of threads at once, and sharing must not change an answer. DeepLIFT-SHAP hooks the modules of the
model it explains; on the shared model those hooks fired in other threads' forwards (their
predictions raised bare ``RuntimeError``/``IndexError``, and the explanation took their activations
for its own). Here four threads predict while a fifth explains with every method, and each answer is
compared with the one a single thread gets.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from serving_models import save_bundle
from threads import LIMIT_S, hammer, probabilities, thread_inputs

from trainfer import Predictor
from trainfer.analysis.attribution import METHODS

pytest.importorskip("captum")

PREDICTING = 4
#: Explanations go on until there were at least this many, and each predicting thread made at least
#: :data:`PREDICTIONS` predictions meanwhile (within ``LIMIT_S``): the two kinds of call overlap.
EXPLANATIONS = 6
PREDICTIONS = 100
#: Small budgets: the point is the threads, not the estimates.
OPTIONS = {
    "integrated_gradients": {"n_steps": 16},
    "kernel_shap": {"n_samples": 32, "show_progress": False},
    "lime": {"n_samples": 32, "show_progress": False},
    "gradient_shap": {"n_samples": 8},
    "occlusion": {"show_progress": False},
}


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Predictor:
    return Predictor.load(save_bundle(tmp_path_factory.mktemp("explain-threads") / "b", 3, labels=["a", "b", "c"]))


def explained(predictor: Predictor, sample: torch.Tensor, method: str) -> torch.Tensor:
    """The attributions of ``sample``, with the sampling methods' random draws seeded (torch's generator
    alone: GradientSHAP, computed by trainfer, no longer draws from NumPy's)."""
    torch.manual_seed(0)  # only this thread draws: predictions use no random numbers
    return predictor.explain(sample, method=method, **OPTIONS.get(method, {})).values


def predicting_while(predictor: Predictor, inputs: list[torch.Tensor], busy: threading.Event) -> list[list]:
    """Start one thread per batch of ``inputs``, each predicting it until ``busy`` is cleared."""
    answers: list[list] = [[] for _ in inputs]

    def work(index: int) -> None:
        while busy.is_set():
            try:
                answers[index].append(probabilities(predictor.predict(inputs[index], top_k=3)))
            except Exception as error:  # noqa: BLE001 - reported by the test thread
                answers[index].append(error)

    workers = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(inputs))]
    for worker in workers:
        worker.start()
    return answers, workers


@pytest.mark.parametrize("method", METHODS)
def test_explaining_beside_predicting_threads_changes_no_answer(predictor, method):
    sample = thread_inputs(1, batch=1, seed=3)[0]
    inputs = thread_inputs(PREDICTING, seed=4)
    expected = [probabilities(predictor.predict(x, top_k=3)) for x in inputs]
    reference = explained(predictor, sample, method)

    busy = threading.Event()
    busy.set()
    answers, workers = predicting_while(predictor, inputs, busy)
    found, deadline = [], time.monotonic() + LIMIT_S
    try:
        while len(found) < EXPLANATIONS or min(map(len, answers)) < PREDICTIONS:
            assert time.monotonic() < deadline, f"under {PREDICTIONS} predictions per thread in {LIMIT_S}s"
            found.append(explained(predictor, sample, method))
    finally:
        busy.clear()
        for worker in workers:
            worker.join(LIMIT_S)
    assert not any(worker.is_alive() for worker in workers), f"threads still predicting after {LIMIT_S}s"

    for index, thread_answers in enumerate(answers):
        errors = [answer for answer in thread_answers if isinstance(answer, Exception)]
        assert not errors, f"{len(errors)} predictions raised, the first {errors[0]!r}"
        for answer in thread_answers:
            np.testing.assert_allclose(answer, expected[index], rtol=1e-6, atol=1e-7)
    for values in found:
        torch.testing.assert_close(values, reference, rtol=1e-5, atol=1e-6)


def _gradient_shap(predictor: Predictor, sample: torch.Tensor, seed: int) -> torch.Tensor:
    """GradientSHAP of ``sample`` drawing from a generator of its own, seeded ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return predictor.explain(sample, method="gradient_shap", n_samples=8, stdevs=0.1, generator=generator).values


def test_gradient_shap_with_a_generator_of_its_own_gives_each_thread_its_values_alone(predictor):
    """torch's default generator is shared: two threads explaining at once each drew part of the other's draws.
    With ``generator=``, each thread's explanations are the ones it gets alone, bit for bit."""
    samples = thread_inputs(2, batch=1, seed=5)
    alone = [_gradient_shap(predictor, sample, seed) for seed, sample in enumerate(samples)]
    found = hammer(lambda seed: _gradient_shap(predictor, samples[seed], seed), [0, 1], calls=10)
    for seed, values in enumerate(found):
        for got in values:
            torch.testing.assert_close(got, alone[seed], rtol=0, atol=0)


def test_gradient_shap_draws_from_the_generator_given_as_from_the_default_one_seeded_alike(predictor):
    """The default (no ``generator``) is unchanged: torch's default generator seeded 0 gives what a generator of
    its own seeded 0 gives; a generator on another device than the inputs is refused in one line."""
    sample = thread_inputs(1, batch=2, seed=6)[0]
    torch.manual_seed(0)
    default = predictor.explain(sample, method="gradient_shap", n_samples=8, stdevs=0.1).values
    torch.testing.assert_close(_gradient_shap(predictor, sample, 0), default, rtol=0, atol=0)
    with pytest.raises(TypeError, match="^generator must be a torch.Generator on cpu; got int 0$"):
        predictor.explain(sample, method="gradient_shap", generator=0)
