"""The benchmark's floor: the least a Python ASGI server costs a request on ``trainfer serve``'s stack.

uvicorn with uvloop and httptools (what ``trainfer serve`` runs on), one process, serving a raw
ASGI app: no framework, no model, no decoding. ``GET`` answers ``{"ready": true}`` (the benchmark
waits for ``/v2/health/ready``); any other request has its body read whole and gets one fixed
Open Inference Protocol response, built at start-up, of the shape ``trainfer serve`` gives a
one-sample request that asks for the ``label`` output. What a real server adds on top (routing,
decoding, the model, encoding, metrics) is beyond this floor.

With ``--bundle PATH``, *the floor running the model*: the same app also runs the bundle's model
(its Predictor's module, eval, ``torch.inference_mode``) on each request's sample, the last float32
values of its body read as one sample of the model's input shape, and takes the top class (the
answer stays the fixed one). It times that forward on the event loop's thread, as ``trainfer
serve`` times its batch, and serves the sum and count at ``GET /metrics`` under
``trainfer_inference_seconds``: the least a Python server that runs the model costs a request, and
so the least overhead at concurrency 1 any server on this stack could show around that forward.

    .venv/bin/python benchmarks/floor_peer.py --name digits_net --port 8003 [--bundle PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn

Message = dict[str, Any]


def inference_response(name: str) -> bytes:
    """The JSON ``trainfer serve`` answers a one-sample request for ``label`` with (a fixed label)."""
    outputs = [{"name": "label", "datatype": "BYTES", "shape": [1], "data": ["0"]}]
    return json.dumps({"model_name": name, "model_version": "1", "outputs": outputs}).encode()


def floor_app(name: str, forward: Callable[[bytes], None] | None = None) -> Callable[..., Awaitable[None]]:
    """The raw ASGI app (HTTP scopes only: run it with ``lifespan="off"``); ``forward``: run on each
    request's body (:func:`model_forward`), timed, its seconds served at ``/metrics``."""
    answers = {"GET": _start_and_body(b'{"ready": true}')}
    other = _start_and_body(inference_response(name))
    timed = [0.0, 0]  # seconds in forward, forwards

    async def app(
        scope: Message, receive: Callable[[], Awaitable[Message]], send: Callable[[Message], Awaitable[None]]
    ) -> None:
        chunks, more = [], True
        while more:  # the request body, read whole (a disconnect has no more_body)
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        if scope["method"] == "GET" and scope["path"] == "/metrics":
            start, body = _start_and_body(_metrics(*timed))
        elif forward is not None and scope["method"] != "GET":
            started = time.perf_counter()
            forward(b"".join(chunks))
            timed[0] += time.perf_counter() - started
            timed[1] += 1
            start, body = other
        else:
            start, body = answers.get(scope["method"], other)
        await send(start)
        await send(body)

    return app


def model_forward(bundle: str) -> Callable[[bytes], None]:
    """The bundle's model on one sample: a request body's last float32 values, shaped as the model's input."""
    import numpy as np
    import torch

    import trainfer

    predictor = trainfer.Predictor.load(bundle)
    model, shape = predictor.model.eval(), predictor.preprocess_spec.input_shape
    values = math.prod(shape)

    def forward(body: bytes) -> None:
        sample = np.frombuffer(body[len(body) - 4 * values :], dtype=np.float32).reshape(1, *shape)
        with torch.inference_mode():
            model(torch.from_numpy(sample.copy())).argmax(1)

    return forward


def _metrics(seconds: float, count: int) -> bytes:
    """The forward's seconds as the one Prometheus histogram's sum and count the benchmark reads."""
    return f"trainfer_inference_seconds_sum {seconds!r}\ntrainfer_inference_seconds_count {count}\n".encode()


def _start_and_body(content: bytes) -> tuple[Message, Message]:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
    return {"type": "http.response.start", "status": 200, "headers": headers}, {
        "type": "http.response.body",
        "body": content,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="model", help="the model name the response carries")
    parser.add_argument("--port", type=int, default=8003)
    parser.add_argument("--bundle", help="also run this bundle's model on each request (the floor running the model)")
    args = parser.parse_args()
    uvicorn.run(
        floor_app(args.name, model_forward(args.bundle) if args.bundle else None),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
