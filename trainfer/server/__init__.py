"""``trainfer serve``: the Predictor over HTTP (Open Inference Protocol), dynamically batched, with metrics.

A layer of its own above ``serve`` (it uses only the Predictor's public API) and below ``demo`` and
``cli``; FastAPI, uvicorn and prometheus_client come with the ``serve`` extra and are imported only here.
"""
