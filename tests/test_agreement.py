"""The agreement checks themselves: they accept rounding and near-ties, and catch real differences."""

import pytest
import torch
from agreement import assert_results_close, assert_same_classes


def classification(p_a: float, p_b: float) -> dict:
    ranked = sorted([("a", p_a), ("b", p_b)], key=lambda pair: -pair[1])
    return {"index": "ab".index(ranked[0][0]), "label": ranked[0][0], "probability": ranked[0][1], "top_k": ranked}


def test_rounding_and_near_ties_pass():
    assert_results_close([classification(0.7, 0.3)], [classification(0.7 + 4e-7, 0.3 - 4e-7)])
    assert_results_close([classification(0.5 + 3e-7, 0.5 - 3e-7)], [classification(0.5 - 3e-7, 0.5 + 3e-7)])
    binary = {"probability": 0.5, "decision": True, "threshold": 0.5}
    assert_results_close([binary], [{**binary, "decision": False, "probability": 0.5 - 1e-7}])


BINARY = {"probability": 0.9, "decision": True, "threshold": 0.5}


BINARY = {"probability": 0.9, "decision": True, "threshold": 0.5}


@pytest.mark.parametrize(
    ("got", "want"),
    [
        (classification(0.6, 0.4), classification(0.7, 0.3)),  # probabilities apart
        ({**classification(0.7, 0.3), "label": "b"}, classification(0.7, 0.3)),  # class flipped at a clear margin
        (BINARY | {"decision": False}, BINARY),  # decision flipped far from the threshold
        ({"values": [1.0, 2.0]}, {"values": [1.0, 2.1]}),
        ({"id": "x", "values": [1.0]}, {"id": "y", "values": [1.0]}),
    ],
)
def test_real_differences_fail(got, want):
    with pytest.raises(AssertionError):
        assert_results_close([got], [want])


def test_classes_may_differ_only_within_the_deviation():
    reference = torch.tensor([[1.0, 0.0], [0.5, 0.5 - 1e-7]])
    assert_same_classes(reference + torch.tensor([[0.0, 0.0], [0.0, 2e-7]]), reference, atol=1e-6)
    with pytest.raises(AssertionError, match="samples \\[0\\]"):
        assert_same_classes(torch.tensor([[0.0, 1.0], [0.5, 0.5 - 1e-7]]), reference, atol=1e-6)
