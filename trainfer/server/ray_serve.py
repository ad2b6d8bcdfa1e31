"""``trainfer serve`` as a Ray Serve deployment: the same app, replicated and autoscaled by Ray.

Each replica runs :func:`~trainfer.server.app.create_app` (the Open Inference Protocol, the file
endpoint, the page, ``/metrics`` per replica) behind Ray Serve's HTTP proxy, so clients see the
same routes and the same answers as from ``trainfer serve``. A replica is ready only once its
bundles are loaded and checked (a bundle that cannot be served fails the replica's start, and Ray
reports why). Requests are batched inside each replica by trainfer's own
:class:`~trainfer.server.batching.DynamicBatcher` rather than Ray's ``@serve.batch``: that one
waits ``batch_wait_timeout_s`` even for a lone request and refuses a request larger than its
batch, where trainfer's runs a request that finds the model idle at once and counts samples.

Ray brings what one machine cannot: replicas on every node of a cluster, autoscaling on the
requests in flight, and its proxy's bounded queue (``max_queued_requests``: beyond it Ray answers
503). Bundles are read by each replica from its own node: give them the same path on every node.

    import ray
    from ray import serve
    from trainfer.server.app import ServerSettings
    from trainfer.server.ray_serve import deployment

    serve.run(deployment(ServerSettings(bundles={"digits": "/data/bundle"}), num_replicas=2))

Needs the ``ray`` extra (``pip install 'trainfer[ray]'``); ``ray`` is imported only here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from trainfer.errors import InputError
from trainfer.extras import require
from trainfer.server.app import ServerSettings, create_app
from trainfer.server.run import freeze_heap

__all__ = ["build", "deployment"]

#: The deployment's name in Ray Serve (its config file's ``deployments: - name:``).
DEPLOYMENT_NAME = "trainfer"


def deployment(
    settings: ServerSettings,
    *,
    num_replicas: int | str = 1,
    autoscaling_config: dict[str, Any] | None = None,
    ray_actor_options: dict[str, Any] | None = None,
    max_queued_requests: int | None = None,
) -> Any:
    """A Ray Serve application serving ``settings`` (pass it to ``ray.serve.run``).

    ``num_replicas``: a count, or ``"auto"`` with ``autoscaling_config`` (Ray's keys, e.g.
    ``{"min_replicas": 1, "max_replicas": 8, "target_ongoing_requests": 32}``);
    ``ray_actor_options``: each replica's resources (default one CPU). Each replica takes up to
    ``settings.max_queue`` requests at once (its batcher's own bound, beyond which it answers 503);
    the proxy queues at most ``max_queued_requests`` more (default ``settings.max_queue``), then
    answers 503 too, so memory never grows without bound.
    """
    if settings.compile:
        raise InputError(
            "Ray Serve: a start-up runtime search (compile=) would run in every replica, which could each choose "
            "another form; run `trainfer compile BUNDLE ...` once and serve the runtime it records"
        )
    serve = require("ray.serve", "ray", "serving on Ray Serve")
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "num_replicas": num_replicas,
        "max_ongoing_requests": settings.max_queue,
        "max_queued_requests": settings.max_queue if max_queued_requests is None else max_queued_requests,
        "ray_actor_options": ray_actor_options or {"num_cpus": 1},
    }
    if autoscaling_config is not None:
        options["autoscaling_config"] = autoscaling_config
    replica = serve.deployment(serve.ingress()(_Replica), **options)
    return replica.bind(dataclasses.asdict(settings))


def build(args: dict[str, Any]) -> Any:
    """The application of a Ray Serve config file (``import_path: trainfer.server.ray_serve:build``):
    ``args`` are :class:`~trainfer.server.app.ServerSettings`' fields (``bundles`` at least);
    replicas, autoscaling and resources come from the file's ``deployments:`` section."""
    fields = {field.name for field in dataclasses.fields(ServerSettings)}
    if not isinstance(args, dict) or "bundles" not in args or set(args) - fields:
        raise InputError(f"the application's args must be a mapping with 'bundles', keys among {sorted(fields)}")
    return deployment(ServerSettings(**args))


class _Replica:
    """One replica: the settings (plain data, so Ray can ship them), and the app built from them."""

    def __init__(self, settings: dict[str, Any]):
        self.settings = ServerSettings(**settings)

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self.settings, on_fatal=_fail, background=False, on_ready=freeze_heap)


def _fail(error: BaseException) -> None:
    """A bundle that cannot be served fails the replica's start (Ray reports the error)."""
    raise error
