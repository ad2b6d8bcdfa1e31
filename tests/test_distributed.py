import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from trainfer.demo import data
from trainfer.demo.train import evaluate, load_checkpoint
from trainfer.serve import distributed

MODEL = textwrap.dedent(
    """
    from torch import nn
    from trainfer.modes.dual import DualModule

    class Net(DualModule):  # a stand-in with BatchNorm, Dropout and an auxiliary head
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                          nn.Dropout(0.1), nn.Flatten())
            self.head, self.aux = nn.Linear(256, 10), nn.Linear(256, 10)
        def forward_train(self, x):
            f = self.features(x)
            return {"logits": self.head(f), "aux_logits": self.aux(f)}
        def forward_infer(self, x):
            return self.head(self.features(x))
    """
)

SCRIPT = MODEL + textwrap.dedent(
    """
    import json, sys
    import torch
    from trainfer.demo import data
    from trainfer.serve import distributed
    from trainfer.demo.train import fit

    out = sys.argv[1]
    distributed.setup()
    torch.manual_seed(0)
    model = Net()
    loaders = data.loaders(batch_size=16, seed=3, subset=96)
    loaders.train.sampler.set_epoch(0)
    result = fit(model, loaders.train, loaders.val, 2, torch.optim.SGD(model.parameters(), lr=0.05), seed=3,
                 checkpoint=f"{out}/last.safetensors", progress=False)
    record = {
        "rank": distributed.rank(), "world_size": distributed.world_size(),
        "train_indices": list(loaders.train.sampler), "val_indices": list(loaders.val.sampler),
        "history": [{k: v for k, v in r.items() if k != "seconds"} for r in result.history],
        "state": {k: v.double().flatten().tolist() for k, v in model.state_dict().items()},
    }
    with open(f"{out}/rank{distributed.rank()}.json", "w") as handle:
        json.dump(record, handle)
    distributed.cleanup()
    """
)


@pytest.mark.slow
def test_two_processes_train_one_model_with_reduced_metrics(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    finished = subprocess.run([*command, str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}
    train = [set(r["train_indices"]) for r in ranks]
    assert not train[0] & train[1] and train[0] | train[1] == set(range(96))
    val = [set(r["val_indices"]) for r in ranks]
    assert not val[0] & val[1] and val[0] | val[1] == set(range(len(data.splits()["val"])))
    assert ranks[0]["history"] == ranks[1]["history"]  # metrics reduced: every rank reports the same
    assert ranks[0]["state"] == ranks[1]["state"]  # parameters and BatchNorm statistics in sync
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["last.safetensors"]  # rank 0 wrote once

    # The reduced validation metrics are those of the whole validation split in one process.
    namespace = {}
    exec(MODEL, namespace)
    model = namespace["Net"]()
    load_checkpoint(tmp_path / "last.safetensors", model, torch.optim.SGD(model.parameters(), lr=0.05))
    for key, value in model.state_dict().items():
        assert value.double().flatten().tolist() == ranks[0]["state"][key]
    metrics = evaluate(model, data.loaders().val)
    assert abs(metrics["accuracy"] - ranks[0]["history"][-1]["val_accuracy"]) < 1e-12
    assert abs(metrics["loss"] - ranks[0]["history"][-1]["val_loss"]) < 1e-6


def test_single_process_helpers_are_identities():
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.shard_indices(5) == range(5)
    assert distributed.all_reduce_sum({"a": 2, "b": 0.5}) == {"a": 2.0, "b": 0.5}
    distributed.barrier()
    distributed.broadcast_buffers(torch.nn.BatchNorm1d(2))
    assert distributed.setup() == torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.slow
def test_the_demo_under_torchrun_gives_a_model_that_deploys_and_verifies(tmp_path):
    from trainfer.reparam.deploy import deploy
    from trainfer.serve.bundle import load

    out = tmp_path / "demo"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "trainfer"]
    command += ["demo", "--out", str(out), "--epochs", "1", "--subset", "64", "--repeats", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["world_size"] == 2 and results["skipped"] == {}
    agreement = results["agreement"]
    assert agreement["class_differences"] == agreement["near_tie_differences"]  # classes flip only at near-ties
    assert "verification (float64)" in results["deploy"]["report"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # one output, no staging left behind

    trained = load(out / "bundle_train")
    inputs = data.normalize(data.splits()["test"].pixels[:16])
    deployed = deploy(trained, inputs)  # raises EquivalenceError unless float64 and float32 checks pass
    assert deployed.trainfer_report.ok
