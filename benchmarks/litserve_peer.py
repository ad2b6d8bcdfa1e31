"""The benchmark's LitServe peer: the same bundle behind LitServe with its own dynamic batching.

LitServe (Lightning AI's FastAPI-based server) passes each request's JSON to an inference worker
process, which gathers up to ``--max-batch`` requests for at most ``--max-delay-ms``, runs them
as one batch and splits the answers back (``LitAPI.batch`` / ``unbatch``). LitServe hands its API
parsed JSON only, so a request is ``{"shape": [N, ...], "b64": "<base64 of the float32 samples>"}``
(the bytes of the Open Inference Protocol's binary tensor, base64-encoded), at
``POST /v2/models/{name}/infer``; the answer is ``{"label": [...]}``. Each request is normalised
by ``Predictor.preprocess``, the batch runs through ``Predictor.scores`` and each request's rows
become typed results (``Predictor.results_from_scores``), as in ``trainfer serve``.

``--workers N`` runs N inference worker processes (``workers_per_device=N`` on the CPU, each
loading the bundle and batching on its own) and N HTTP front-end processes sharing the port
(``num_api_servers=N``, LitServe's own default for N inference workers).

    .venv/bin/python benchmarks/litserve_peer.py BUNDLE --port 8002 [--max-batch 32 --max-delay-ms 5] [--workers 1]
"""

from __future__ import annotations

import argparse
import base64
import binascii
import os
import signal
from typing import Any

import litserve as ls
import numpy as np
import torch
from fastapi import HTTPException

from trainfer import Predictor
from trainfer.errors import TrainferError, one_line

#: Samples (floats) one request may carry: bounds what a request makes the worker allocate.
MAX_VALUES = 32 * 3 * 224 * 224


class BundleAPI(ls.LitAPI):
    """A trainfer bundle as a LitServe API; batches are lists of per-request sample tensors."""

    def __init__(self, bundle: str, **options: Any):
        super().__init__(**options)
        self.bundle = bundle

    def setup(self, device: str) -> None:
        self.predictor = Predictor.load(self.bundle)

    def decode_request(self, request: dict) -> torch.Tensor:
        try:
            shape = [int(n) for n in request["shape"]]
            if not 0 < int(np.prod(shape)) <= MAX_VALUES:
                raise ValueError(f"shape {shape}: 1 to {MAX_VALUES} values")
            values = np.frombuffer(base64.b64decode(request["b64"], validate=True), dtype=np.float32)
            return self.predictor.preprocess(values.reshape(shape))
        except (KeyError, TypeError, ValueError, binascii.Error, TrainferError) as error:
            raise HTTPException(400, one_line(error)) from None

    def batch(self, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        return torch.cat(inputs), [len(x) for x in inputs]

    def predict(self, x: Any) -> Any:
        if isinstance(x, tuple):  # a batch
            joined, sizes = x
            return self.predictor.scores(joined), sizes
        return self.predictor.scores(x), [len(x)]

    def unbatch(self, output: tuple[torch.Tensor, list[int]]) -> list[torch.Tensor]:
        scores, sizes = output
        return list(torch.split(scores, sizes))

    def encode_response(self, output: Any) -> dict[str, list[str]]:
        if isinstance(output, tuple):  # unbatched (max_batch 1): (scores, sizes)
            output = output[0]
        results = self.predictor.results_from_scores([output], 1)
        return {"label": [r.label for r in results]}


def stop_group_on_sigterm() -> None:
    """Lead a process group and pass SIGTERM to all of it: LitServe's API and inference worker
    processes outlive a terminated parent otherwise."""
    os.setpgrp()

    def stop(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.killpg(os.getpgrp(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--name", default="model")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-delay-ms", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=1, help="inference worker and HTTP server processes")
    args = parser.parse_args()
    stop_group_on_sigterm()
    api = BundleAPI(
        args.bundle,
        max_batch_size=args.max_batch,
        batch_timeout=args.max_delay_ms / 1000,
        api_path=f"/v2/models/{args.name}/infer",
    )
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=args.workers, healthcheck_path="/v2/health/ready")
    server.run(
        host="127.0.0.1",
        port=args.port,
        num_api_servers=args.workers,
        log_level="warning",
        generate_client_file=False,
    )


if __name__ == "__main__":
    main()
