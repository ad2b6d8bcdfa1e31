"""One Predictor shared by threads: wrong results, changed buffers, and calls per second.

T threads start together (a barrier) and each calls ``predict`` C times on its own batch with one
shared Predictor; every result is compared with the single-threaded one (float32 tolerance), and
every weight and BatchNorm buffer with its value before. Three ways to share, in one run:

* ``loaded``: ``Predictor.load(bundle)`` (the predictor owns the model: eval once, calls in parallel);
* ``caller's eval model``: ``Predictor(model)`` with a model in eval (nothing switched, in parallel);
* ``caller's training model``: ``Predictor(model)`` with a model in training mode (switched to
  eval and back per batch under the model's lock: calls run one at a time).

    .venv/bin/python benchmarks/bench_shared_predictor.py [--threads 8] [--calls 50] [--batch 4]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import threading
import time
from pathlib import Path

import torch

import trainfer
from trainfer.models import digits_net
from trainfer.testing import randomize_batchnorm

SPEC = {"input_shape": [1, 8, 8]}


def shared_run(predictor: trainfer.Predictor, model: torch.nn.Module, threads: int, calls: int, batch: int):
    """(wrong results, changed state entries, calls per second) of ``threads`` x ``calls`` shared calls."""
    inputs = [torch.rand(batch, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(threads)]
    reference = [[r.probability for r in predictor.predict(x)] for x in inputs]
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    barrier, wrong, lock = threading.Barrier(threads + 1), [0], threading.Lock()

    def work(index: int) -> None:
        barrier.wait()
        for _ in range(calls):
            got = [r.probability for r in predictor.predict(inputs[index])]
            bad = any(abs(g - e) > 1e-5 for g, e in zip(got, reference[index], strict=True))
            with lock:
                wrong[0] += bad

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    barrier.wait()
    start = time.perf_counter()
    for worker in workers:
        worker.join()
    seconds = time.perf_counter() - start
    changed = sum(not torch.equal(tensor, model.state_dict()[name]) for name, tensor in before.items())
    return wrong[0], changed, threads * calls / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()

    torch.manual_seed(0)
    trained = randomize_batchnorm(digits_net(), seed=0)
    with tempfile.TemporaryDirectory() as folder:
        bundle = trainfer.save(trained.eval(), Path(folder) / "digits", preprocess=SPEC)
        loaded = trainfer.Predictor.load(bundle)
        in_eval, in_training = copy.deepcopy(trained).eval(), copy.deepcopy(trained).train()
        cases = {
            "loaded": (loaded, loaded.model),
            "caller's eval model": (trainfer.Predictor(in_eval, preprocess=SPEC), in_eval),
            "caller's training model": (trainfer.Predictor(in_training, preprocess=SPEC), in_training),
        }
        total = args.threads * args.calls
        print(
            f"{args.threads} threads x {args.calls} calls, batch {args.batch}x1x8x8, digits_net, torch threads "
            f"{torch.get_num_threads()}"
        )
        for name, (predictor, model) in cases.items():
            wrong, changed, rate = shared_run(predictor, model, args.threads, args.calls, args.batch)
            print(f"  {name:24s} wrong {wrong}/{total}, state entries changed {changed}, {rate:,.0f} calls/s")


if __name__ == "__main__":
    main()
