"""Ensembles: weighted averages of the members' own numbers, spreads, validation, refusals."""

import json

import numpy as np
import pytest
import torch
from agreement import assert_results_close, assert_same_classes
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from serving_models import save_bundle, write_pngs

import trainfer
from trainfer.cli import main
from trainfer.serve.ensemble import Ensemble, EnsembleClassificationResult

LABELS = ["cat", "dog", "owl"]
TOL = 1e-6


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """Bundles per task; members differ in weights, output kind, normalisation and dtype."""
    root = tmp_path_factory.mktemp("bundles")
    norm = {"mean": [0.4], "std": [0.3]}
    return {
        "classification": [
            save_bundle(root / "c0", 0, labels=LABELS),
            save_bundle(root / "c1", 1, labels=LABELS, final="softmax", preprocess=norm),
            save_bundle(root / "c2", 2, labels=LABELS, width=5),
            save_bundle(root / "c3", 3, labels=LABELS, preprocess={**norm, "dtype": "float64"}, dtype=torch.float64),
        ],
        "binary": [
            save_bundle(root / "b0", 4, task="binary", outputs=1, final="sigmoid"),
            save_bundle(root / "b1", 5, task="binary", outputs=1, preprocess=norm),
        ],
        "regression": [
            save_bundle(root / "r0", 6, task="regression", outputs=2, preprocess={"target_mean": [10, -1]}),
            save_bundle(root / "r1", 7, task="regression", outputs=2, preprocess={"target_std": [3, 0.5]}),
        ],
    }


@pytest.fixture(scope="module")
def members(bundles):
    return {task: [trainfer.Predictor.load(path) for path in paths] for task, paths in bundles.items()}


def weighted(per_member: np.ndarray, weights: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Reference mean and population std over axis 0 with normalised ``weights``."""
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    w = w.reshape(-1, *[1] * (per_member.ndim - 1))
    mean = (w * per_member).sum(0)
    return mean, np.sqrt((w * (per_member - mean) ** 2).sum(0))


def class_probabilities(results) -> np.ndarray:
    """``(N, C)`` probabilities in label order from results (or their records) carrying every class in top_k."""
    pairs = [r["top_k"] if isinstance(r, dict) else r.top_k for r in results]
    return np.array([[dict(map(tuple, p))[label] for label in LABELS] for p in pairs])


@settings(max_examples=15)
@given(
    chosen=st.lists(st.integers(0, 3), min_size=1, max_size=4),
    raw_weights=st.lists(st.floats(0, 5), min_size=4, max_size=4).filter(lambda w: sum(w) > 0.1),
    seed=st.integers(0, 2**16),
)
def test_classification_averages_members_probabilities(members, chosen, raw_weights, seed):
    team = [members["classification"][i] for i in chosen]
    weights = raw_weights[: len(team)] if sum(raw_weights[: len(team)]) > 0.1 else None
    x = torch.rand(7, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    ensemble = trainfer.Predictor.ensemble(team, weights=weights)
    results = ensemble.predict(x, top_k=3)

    per_member = np.stack([class_probabilities(m.predict(x, top_k=3)) for m in team])
    mean, std = weighted(per_member, weights or [1.0] * len(team))
    np.testing.assert_allclose(class_probabilities(results), mean, atol=TOL)
    chosen_class = [r.index for r in results]
    assert_same_classes(torch.tensor(class_probabilities(results)), torch.tensor(mean), atol=TOL)
    assert chosen_class == class_probabilities(results).argmax(1).tolist()
    np.testing.assert_allclose([r.spread for r in results], std[np.arange(7), chosen_class], atol=TOL)
    assert all(isinstance(r, EnsembleClassificationResult) and r.members == len(team) for r in results)
    assert (ensemble.task, ensemble.labels, ensemble.spec["members"]) == ("classification", LABELS, len(team))
    assert [r.label for r in results] == [LABELS[i] for i in chosen_class]


def test_binary_averages_positive_probabilities(members):
    x = torch.rand(9, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    team = members["binary"]
    results = Ensemble(team, weights=[1, 3]).predict(x)
    per_member = np.array([[r.probability for r in m.predict(x)] for m in team])
    mean, std = weighted(per_member, [1, 3])
    np.testing.assert_allclose([r.probability for r in results], mean, atol=TOL)
    np.testing.assert_allclose([r.spread for r in results], std, atol=TOL)
    clear = np.abs(mean - 0.5) > TOL  # a decision may flip only within rounding of the threshold
    assert [r.decision for r, c in zip(results, clear) if c] == [bool(p >= 0.5) for p in mean[clear]]
    assert {r.members for r in results} == {2} and std.max() > 1e-3  # the members do disagree


def test_regression_averages_values_in_each_members_target_units(members):
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    team = members["regression"]
    results = Ensemble(team).predict(x)
    per_member = np.array([[r.values for r in m.predict(x)] for m in team])
    mean, std = weighted(per_member, [1, 1])
    np.testing.assert_allclose([r.values for r in results], mean, atol=TOL)
    np.testing.assert_allclose([r.spread for r in results], std, atol=TOL)
    assert results[0].to_record()["members"] == 2 and len(results[0].to_record()["spread"]) == 2


def test_members_read_image_files_with_their_own_preprocessing(members, tmp_path):
    paths = [str(p) for p in write_pngs(tmp_path, 5)]
    team = members["classification"][:2]  # raw pixels vs (x - 0.4) / 0.3
    results = Ensemble(team, weights=[2, 1]).predict(paths, top_k=3)
    per_member = np.stack([class_probabilities(m.predict(paths, top_k=3)) for m in team])
    np.testing.assert_allclose(class_probabilities(results), weighted(per_member, [2, 1])[0], atol=TOL)


def test_one_member_is_the_member_itself_with_zero_spread(members):
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    member = members["classification"][1]
    alone = Ensemble([member]).predict(x, top_k=3)
    np.testing.assert_allclose(class_probabilities(alone), class_probabilities(member.predict(x, top_k=3)), atol=TOL)
    assert [r.spread for r in alone] == [0.0] * 4


def test_predict_iter_streams_a_one_shot_iterator_in_batches(members):
    x = torch.rand(11, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    team = members["classification"][:3]
    for member in team:
        member.batch_size = 4
    try:
        pulled = []

        def samples():
            for i, sample in enumerate(x):
                pulled.append(i)
                yield sample

        ensemble = Ensemble(team)
        stream = ensemble.predict_iter(samples(), top_k=3)
        first = next(stream)
        assert len(pulled) <= 2 * 4  # one batch ahead at most, not the whole input
        streamed = [first, *stream]
        whole = ensemble.predict(x, top_k=3)  # the same batches of 4: the same computation
    finally:
        for member in team:
            member.batch_size = 64
    # Stacked streamed samples vs slices of one tensor: the same batches, other memory: within rounding.
    assert_results_close(streamed, whole)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([1.0], "expected 2 ensemble weights"),
        ([1.0, -0.5], "non-negative"),
        ([1.0, float("nan")], "finite"),
        ([0.0, 0.0], "not all be zero"),
    ],
)
def test_bad_weights_are_refused(members, weights, message):
    with pytest.raises(ValueError, match=message):
        Ensemble(members["binary"], weights=weights)


@pytest.mark.parametrize(
    ("huge", "small"),
    [([1e308, 1e308], [1, 1]), ([1e308, 5e307, 1e308], [2, 1, 2]), ([5e-324, 1e-323], [1, 2])],
)
def test_weights_whose_sum_overflows_weigh_as_their_ratios(members, huge, small):
    """Attacker round 10 F5: ``1e308, 1e308`` (each finite) summed to inf: every probability 0, a wrong
    class, exit 0. Only the ratios count: the same answers as in small numbers, to the bit."""
    team = members["classification"][: len(huge)]
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(Ensemble(team, weights=huge).weights, Ensemble(team, weights=small).weights)
    assert Ensemble(team, weights=huge).predict(x, top_k=3) == Ensemble(team, weights=small).predict(x, top_k=3)


def test_cli_weights_whose_sum_overflows_answer_as_their_ratios(bundles, tmp_path):
    paths = [str(p) for p in write_pngs(tmp_path / "images", 3)]
    models = [str(path) for path in bundles["classification"][:2]]
    outputs = [
        CliRunner().invoke(main, ["predict", *models, *paths, "--weights", weights, "--format", "jsonl"])
        for weights in ("1e308,1e308", "1,1")
    ]
    assert [result.exit_code for result in outputs] == [0, 0]
    assert outputs[0].stdout == outputs[1].stdout and '"probability": 0.0' not in outputs[0].stdout


def test_zero_weight_member_does_not_vote(members):
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    first, second = members["binary"]
    results = Ensemble([first, second], weights=[0, 2]).predict(x)
    np.testing.assert_allclose([r.probability for r in results], [r.probability for r in second.predict(x)], atol=TOL)


def test_disagreeing_members_are_refused_with_the_difference_named(members, tmp_path):
    classifier = members["classification"][0]
    renamed = trainfer.Predictor.load(save_bundle(tmp_path / "l", 0, labels=["cat", "dog", "emu"]))
    bigger = trainfer.Predictor(classifier.model, labels=LABELS, preprocess={"input_shape": [1, 9, 9]})
    cases = [
        ([classifier, members["binary"][0]], "disagree on task: member 0 has 'classification', member 1 has 'binary'"),
        ([classifier, renamed], r"disagree on labels: .*'owl'.*'emu'"),
        ([classifier, bigger], r"disagree on input_shape: member 0 has \(1, 8, 8\), member 1 has \(1, 9, 9\)"),
    ]
    for team, message in cases:
        with pytest.raises(ValueError, match=message):
            Ensemble(team)
    with pytest.raises(ValueError, match="at least one predictor"):
        Ensemble([])


def test_csv_members_must_read_the_same_columns():
    linear = torch.nn.Linear(2, 1)
    first = trainfer.Predictor(linear, task="regression", preprocess={"columns": ["a", "b"]})
    second = trainfer.Predictor(linear, task="regression", preprocess={"columns": ["a", "c"]})
    with pytest.raises(ValueError, match=r"disagree on columns: member 0 has \['a', 'b'\], member 1 has \['a', 'c'\]"):
        Ensemble([first, second])


def test_cli_serves_several_bundles_as_their_ensemble(bundles, members, tmp_path):
    paths = [str(p) for p in write_pngs(tmp_path / "images", 3)]
    models = [str(path) for path in bundles["classification"][:3]]
    result = CliRunner().invoke(
        main, ["predict", *models, *paths, "--weights", "1,2,1", "--top-k", "3", "--format", "jsonl"]
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    expected = Ensemble(members["classification"][:3], weights=[1, 2, 1]).predict(paths, top_k=3)
    assert [r["id"] for r in records] == paths
    assert_results_close([{k: v for k, v in r.items() if k != "id"} for r in records], expected, atol=TOL)
    assert {r["members"] for r in records} == {3}


def test_cli_refuses_a_bad_ensemble_in_one_line(bundles, tmp_path):
    image = str(write_pngs(tmp_path / "images", 1)[0])
    classifier, binary = str(bundles["classification"][0]), str(bundles["binary"][0])
    cases = [
        ([classifier, binary, image], "ensemble members disagree on task"),
        ([classifier, classifier, image, "--weights", "1"], "expected 2 ensemble weights"),
        ([classifier, classifier, image, "--weights", "1,x"], "expected comma-separated numbers"),
        ([classifier, classifier, image, "--explain", str(tmp_path / "x")], "--explain takes one bundle"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(main, ["predict", *args])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output


def test_multi_head_members_are_refused():
    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 4)

        def forward(self, x):
            out = self.linear(x)
            return {"kind": out[:, :3], "size": out[:, 3:]}

    heads = {"kind": "classification", "size": "regression"}
    member = trainfer.Predictor(TwoHeads(), heads=heads, preprocess={"input_shape": [2]})
    with pytest.raises(ValueError, match="member 0 is 'multi-head': expected a classification, binary or regression"):
        Ensemble([member, member])
