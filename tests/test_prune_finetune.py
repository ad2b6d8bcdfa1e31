"""The built-in fine-tuning loop (trainfer.serve.finetune) and ``trainfer prune --finetune-epochs`` on digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.nn import functional as F

import trainfer
from trainfer.cli import main
from trainfer.demo import data
from trainfer.errors import InputError, NonFiniteError
from trainfer.models import digits_net
from trainfer.serve.finetune import FinetuneLoop

pytest.importorskip("torch_pruning")


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def digits(split: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    part = data.splits()[split]
    return data.normalize(part.pixels[:count]), part.labels[:count]


def loss_of(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.inference_mode():
        return float(F.cross_entropy(model.eval()(inputs), labels))


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_the_loop_lowers_the_cross_entropy_and_reports_each_epoch(optimizer):
    inputs, labels = digits("train", 256)
    model = trainfer.deploy(digits_net(width=8).eval(), inputs[:2])
    before = loss_of(model, inputs, labels)
    seen = []
    loop = FinetuneLoop(inputs, labels, epochs=2, lr=3e-3, optimizer=optimizer, batch_size=32, progress=seen.append)
    records = loop(model)
    assert records == seen and [r.epoch for r in records] == [1, 2] and model.training
    assert loss_of(model, inputs, labels) < before and 0 <= records[-1].accuracy <= 1
    assert str(records[0]).startswith("fine-tuning epoch 1/2: loss ")


@pytest.mark.parametrize(
    "options",
    [{"epochs": -1}, {"lr": 0.0}, {"lr": float("nan")}, {"optimizer": "lbfgs"}, {"batch_size": 0},
     {"labels": torch.zeros(3, dtype=torch.long)}, {"labels": torch.zeros(8)},
     {"labels": torch.zeros(8, 2, dtype=torch.long)}, {"labels": torch.zeros(1, 8, dtype=torch.long)},
     {"inputs": torch.zeros(8, 64, dtype=torch.long)}],
)  # fmt: skip
def test_options_and_data_are_checked(options):
    arguments = {"inputs": torch.zeros(8, 64), "labels": torch.zeros(8, dtype=torch.long), **options}
    with pytest.raises(InputError):
        FinetuneLoop(**arguments)


def test_a_column_of_labels_is_read_as_the_gates_read_it():
    """``--finetune-labels`` of shape (N, 1) is taken as ``--labels`` is (attacker round 7: one rule for both)."""
    labels = torch.arange(8) % 3
    assert torch.equal(FinetuneLoop(torch.zeros(8, 64), labels[:, None]).labels, labels)


def test_labels_beyond_the_outputs_and_a_non_finite_loss_are_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(InputError, match="labels go up to 12; the model has 10 classes"):
        FinetuneLoop(torch.randn(4, 64), torch.tensor([0, 1, 2, 12]))(model)
    inputs = torch.randn(4, 64)
    inputs[2, 5] = float("nan")
    with pytest.raises(NonFiniteError, match="lower the learning rate"):
        FinetuneLoop(inputs, torch.tensor([0, 1, 2, 3]))(model)


def test_cli_prune_fine_tunes_on_labelled_digits(tmp_path):
    deployed = trainfer.deploy(digits_net(width=16).eval(), torch.randn(2, 1, 8, 8))
    trainfer.save(
        deployed, tmp_path / "in", task="classification", labels=data.LABELS, preprocess=data.preprocess_spec()
    )
    parts = data.splits()
    for name, part, count in (("train", parts["train"], 300), ("val", parts["val"], 100)):
        # .npy inputs are raw values after pixel scaling (images alone are scaled on reading)
        np.save(tmp_path / f"{name}.npy", (part.pixels[:count].float() * data.PIXEL_SCALE).numpy())
        np.save(tmp_path / f"{name}_labels.npy", part.labels[:count].numpy())
    common = ["prune", str(tmp_path / "in"), "--ratio", "0.5", "--min-agreement", "0", "--max-accuracy-drop", "1"]
    gate = ["--data", str(tmp_path / "val.npy"), "--labels", str(tmp_path / "val_labels.npy"), "--no-search"]
    tune = ["--finetune-data", str(tmp_path / "train.npy"), "--finetune-labels", str(tmp_path / "train_labels.npy")]
    runner = CliRunner()
    plain = runner.invoke(main, [*common, *gate, "-o", str(tmp_path / "plain")])
    tuned = runner.invoke(main, [*common, *gate, *tune, "--finetune-epochs", "1", "--finetune-lr", "3e-3",
                                 "-o", str(tmp_path / "tuned")])  # fmt: skip
    assert plain.exit_code == 0 and tuned.exit_code == 0, plain.output + tuned.output
    assert "fine-tuning epoch 1/1: loss" in tuned.output and "fine-tuning" not in plain.output
    inputs, labels = digits("train", 300)
    plain_model, tuned_model = trainfer.load(tmp_path / "plain"), trainfer.load(tmp_path / "tuned")
    assert [p.shape for p in plain_model.parameters()] == [p.shape for p in tuned_model.parameters()]
    assert loss_of(tuned_model, inputs, labels) < loss_of(plain_model, inputs, labels)

    unlabelled = runner.invoke(main, [*common, "--finetune-epochs", "1", "-o", str(tmp_path / "x")])
    assert unlabelled.exit_code == 2 and "--finetune-epochs needs labelled data" in unlabelled.output
    on_gate_data = runner.invoke(main, [*common, *gate, "--finetune-epochs", "1", "-o", str(tmp_path / "y")])
    assert on_gate_data.exit_code == 0 and "note: fine-tuning on the gate's data" in on_gate_data.output
