import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from trainfer.demo import data
from trainfer.demo.train import _decode, _encode, evaluate, fit, load_checkpoint, logits_of, objective, save_checkpoint
from trainfer.errors import BundleError
from trainfer.modes.contexts import snapshot_modes
from trainfer.modes.dual import DualModule


class TinyNet(DualModule):
    """A stand-in with BatchNorm, Dropout and an auxiliary head, like digits_net (tests only)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.1), nn.Flatten()
        )
        self.head = nn.Linear(8 * 64, 10)
        self.aux = nn.Linear(8 * 64, 10)

    def forward_train(self, x):
        features = self.features(x)
        return {"logits": self.head(features), "aux_logits": self.aux(features)}

    def forward_infer(self, x):
        return self.head(self.features(x))


def _setup(seed=0, subset=128):
    model = TinyNet(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    return model, optimizer, scheduler, data.loaders(batch_size=32, seed=7, subset=subset)


def _without_time(history):
    return [{key: value for key, value in record.items() if key != "seconds"} for record in history]


def test_fit_learns_and_reports_every_epoch():
    model, optimizer, _, loaders = _setup(subset=400)
    result = fit(model, loaders.train, loaders.val, 3, optimizer, progress=False)
    assert [record["epoch"] for record in result.history] == [1, 2, 3]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.best_val_accuracy == max(record["val_accuracy"] for record in result.history) > 0.8
    assert evaluate(model, loaders.val)["accuracy"] == result.history[-1]["val_accuracy"]


def test_fit_switches_modes_and_restores_them():
    model, optimizer, _, loaders = _setup(subset=64)
    model.features[1].eval()  # a frozen BatchNorm inside a training model: a mixed state to keep
    before = snapshot_modes(model)
    seen = []
    model.head.register_forward_hook(
        lambda module, args, output: seen.append(
            (module.training, torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        )
    )
    fit(model, loaders.train, loaders.val, 1, optimizer, progress=False)
    assert snapshot_modes(model) == before
    assert (True, True, False) in seen  # training: train mode with gradients
    assert (False, False, True) in seen  # evaluation: eval mode under inference_mode
    assert set(seen) == {(True, True, False), (False, False, True)}


def test_objective_weights_auxiliary_heads():
    logits, aux, targets = torch.randn(6, 10), torch.randn(6, 10), torch.randint(0, 10, (6,))
    expected = F.cross_entropy(logits, targets) + 0.3 * F.cross_entropy(aux, targets)
    got = objective({"logits": logits, "aux_logits": aux}, targets, F.cross_entropy, 0.3)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(objective(logits, targets, F.cross_entropy, 0.3), F.cross_entropy(logits, targets))
    with pytest.raises(ValueError, match=r"'logits' entry; got keys \['main'\]"):
        logits_of({"main": logits})
    with pytest.raises(TypeError, match="got tuple"):
        logits_of((logits,))


def test_evaluate_matches_a_manual_count():
    model, _, _, loaders = _setup()
    metrics = evaluate(model, loaders.test)
    model.eval()
    split = data.splits()["test"]
    with torch.no_grad():
        logits = model(data.normalize(split.pixels))
    assert metrics["accuracy"] == int((logits.argmax(1) == split.labels).sum()) / len(split)
    assert math.isclose(metrics["loss"], float(F.cross_entropy(logits, split.labels)), rel_tol=1e-5)


def test_resume_from_checkpoint_equals_uninterrupted_training(tmp_path):
    model, optimizer, scheduler, loaders = _setup()
    straight = fit(model, loaders.train, loaders.val, 3, optimizer, scheduler=scheduler, seed=5, progress=False)

    first, optimizer1, scheduler1, loaders1 = _setup()
    fit(
        first,
        loaders1.train,
        loaders1.val,
        2,
        optimizer1,
        scheduler=scheduler1,
        seed=5,
        checkpoint=tmp_path / "last.safetensors",
        progress=False,
    )
    resumed, optimizer2, scheduler2, loaders2 = _setup(seed=1)  # other initial weights: all must come from the file
    result = fit(
        resumed,
        loaders2.train,
        loaders2.val,
        3,
        optimizer2,
        scheduler=scheduler2,
        seed=5,
        checkpoint=tmp_path / "last.safetensors",
        resume=True,
        progress=False,
    )
    assert _without_time(result.history) == _without_time(straight.history)
    assert result.best_epoch == straight.best_epoch
    for key, value in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()


def test_checkpoint_round_trip_and_mismatch_errors(tmp_path):
    model, optimizer, scheduler, loaders = _setup(subset=32)
    result = fit(model, loaders.train, loaders.val, 1, optimizer, scheduler=scheduler, progress=False)
    path = save_checkpoint(tmp_path / "ckpt.safetensors", model, optimizer, scheduler, result)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]  # no temporary left behind

    other, other_optimizer, other_scheduler, _ = _setup(seed=3)
    restored = load_checkpoint(path, other, other_optimizer, other_scheduler)
    assert restored.history == result.history
    assert other_optimizer.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    assert isinstance(other_optimizer.state_dict()["param_groups"][0]["betas"], tuple)
    for key, value in optimizer.state_dict()["state"][0].items():
        assert torch.equal(other_optimizer.state_dict()["state"][0][key], value)

    wider = nn.Sequential(nn.Linear(3, 4))
    with pytest.raises(BundleError, match=r"missing \['0.bias', '0.weight'\].*unexpected \[.*'aux.bias'"):
        load_checkpoint(path, wider, torch.optim.Adam(wider.parameters()))
    mis_shaped = TinyNet()
    mis_shaped.head = nn.Linear(8 * 64, 11)
    with pytest.raises(BundleError, match=r"head.weight: expected \(11, 512\), got \(10, 512\)"):
        load_checkpoint(path, mis_shaped, torch.optim.Adam(mis_shaped.parameters()), scheduler)
    plain = save_checkpoint(tmp_path / "plain.safetensors", model, optimizer, None, result)
    with pytest.raises(BundleError, match="written without a scheduler"):
        load_checkpoint(plain, other, other_optimizer, other_scheduler)


def test_load_checkpoint_refuses_foreign_files_without_unpickling(tmp_path):
    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    pickled = tmp_path / "evil.safetensors"
    torch.save({"x": Payload()}, pickled)
    model, optimizer, _, _ = _setup()
    with pytest.raises(BundleError, match="cannot read checkpoint"):
        load_checkpoint(pickled, model, optimizer)
    assert not (tmp_path / "pwned").exists()

    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, tmp_path / "weights.safetensors")
    with pytest.raises(BundleError, match="not a trainfer checkpoint"):
        load_checkpoint(tmp_path / "weights.safetensors", model, optimizer)


def test_sync_batchnorm_is_refused_on_cpu():
    model, optimizer, _, loaders = _setup(subset=32)
    with pytest.raises(ValueError, match="sync_batchnorm needs a CUDA model"):
        fit(model, loaders.train, loaders.val, 1, optimizer, sync_batchnorm=True, progress=False)


def test_fit_saves_the_best_epoch_as_a_bundle(tmp_path):
    from trainfer.models import digits_net
    from trainfer.serve.bundle import load, read_manifest

    torch.manual_seed(0)
    model = digits_net(width=4)
    loaders = data.loaders(batch_size=32, subset=96)
    metadata = {"task": "classification", "labels": data.LABELS, "preprocess": data.preprocess_spec()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    result = fit(
        model,
        loaders.train,
        loaders.val,
        3,
        optimizer,
        best_bundle=tmp_path / "best",
        bundle_metadata=metadata,
        progress=False,
    )
    manifest = read_manifest(tmp_path / "best")
    assert manifest.labels == data.LABELS and manifest.preprocess.mean == data.preprocess_spec()["mean"]
    saved = evaluate(load(tmp_path / "best"), loaders.val)
    assert saved == {"loss": result.best_val_loss, "accuracy": result.best_val_accuracy}
    assert [p.name for p in tmp_path.iterdir()] == ["best"]


_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**53), 2**53),
    st.floats(allow_nan=False),
    st.text(max_size=5),
    st.builds(
        lambda n, seed: torch.randn(n, generator=torch.Generator().manual_seed(seed)),
        st.integers(0, 4),
        st.integers(0, 99),
    ),
)
_states = st.recursive(
    _leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(st.one_of(st.integers(0, 9), st.text(min_size=1, max_size=4)), inner, max_size=3),
    ),
    max_leaves=12,
)


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return type(b) is dict and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


@settings(max_examples=60)
@given(state=_states)
def test_checkpoint_state_encoding_round_trips_through_json(state):
    import json

    tensors = {}
    encoded = json.loads(json.dumps(_encode(state, "state", tensors)))
    assert _same(_decode(encoded, tensors), state)
