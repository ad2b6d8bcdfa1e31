"""The ``Host`` a request may name (``trainfer.server.hosts``: no DNS rebinding of a local server) and
the security headers of the server's answers and pages (``trainfer.server.pages``)."""

from __future__ import annotations

import base64
import hashlib
import json
import re

import pytest
from server_process import get, running_server
from serving_models import save_bundle
from test_server_units import _digits_app, _ready, asgi_request, run

from trainfer.errors import InputError
from trainfer.server.hosts import HostCheck, check_allowed_hosts

pytest.importorskip("fastapi")

EVIL = b"rebind.attacker.example:8712"


@pytest.mark.parametrize(
    ("listening", "allowed", "accepted", "refused"),
    [
        (
            "127.0.0.1",
            (),
            [b"localhost", b"localhost:8000", b"127.0.0.1:1", b"[::1]", b"[::1]:8000", b"LocalHost:80"],
            [EVIL, b"10.0.0.7:8000", b"127.0.0.1.nip.io", b"localhost:x", b"localhost.evil", b"[::2]", b""],
        ),
        ("::1", (), [b"localhost:9", b"[::1]:9"], [EVIL, b"[fe80::1]"]),
        ("localhost", (), [b"127.0.0.1:8000"], [EVIL]),
        ("0.0.0.0", (), [b"localhost:8000", b"10.0.0.7:8000", b"[fe80::1]:80", b"192.168.1.5"], [EVIL, b"box.lan"]),
        ("192.168.1.5", (), [b"192.168.1.5:8000", b"192.168.1.5"], [EVIL, b"localhost:8000", b"10.0.0.7"]),
        ("fe80::1", (), [b"[fe80::1]:8000", b"[FE80::1]"], [b"[::1]", EVIL]),
        ("127.0.0.1", ("api.example.com", "10.0.0.7"), [b"API.example.com:443", b"10.0.0.7", b"localhost"], [EVIL]),
        ("127.0.0.1", ("*",), [EVIL, b"anything"], []),
    ],
)
def test_a_host_is_accepted_by_the_listening_address_and_the_names_allowed(listening, allowed, accepted, refused):
    check = HostCheck(listening, check_allowed_hosts(allowed, "allowed_hosts"))
    for value in accepted:
        assert check.refusal([(b"host", value)]) is None, value
        assert check.refusal([(b"host", value)]) is None, value  # remembered
    for value in refused:
        assert check.refusal([(b"host", value)]) is not None, value
    assert check.refusal([]) is None  # HTTP/1.0: no Host; no browser omits it


@pytest.mark.parametrize("names", [["example.com:8000"], ["http://example.com"], ["exa mple.com"], [""], "x.com"])
def test_allowed_hosts_are_names_or_addresses_without_a_port(names):
    with pytest.raises(InputError, match="allowed_hosts"):
        check_allowed_hosts(names, "allowed_hosts")


def test_a_rebinding_pages_host_is_a_400_naming_it_on_every_route_even_the_slash_redirect():
    """The page's name reached every route (and FastAPI's 307 for a trailing slash copied it into
    ``location``); the loopback names still serve, any port; a Host given twice is refused."""
    app = _digits_app()
    request = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]})

    async def main():
        async with app.router.lifespan_context(app):
            await _ready(app)
            refused = [
                await asgi_request(app, path, method, request.encode(), headers=((b"host", EVIL),))
                for path, method in [
                    ("/", "GET"),
                    ("/v2/models", "GET"),
                    ("/v2/models/digits/", "GET"),
                    ("/v2/models/digits/infer", "POST"),
                    ("/v2/models/digits/predict?filename=x.npy", "POST"),
                ]
            ]
            twice = await asgi_request(app, "/v2/models", headers=((b"host", b"localhost"), (b"host", EVIL)))
            served = await asgi_request(app, "/v2/models", headers=((b"host", b"localhost:8000"),))
            return refused, twice, served

    refused, twice, served = run(main(), seconds=60)
    expected = (
        "Host 'rebind.attacker.example:8712' is not a name of this server: it answers 127.0.0.1, [::1], localhost "
        "(any port); name others with --allowed-hosts (ServerSettings.allowed_hosts)"
    )
    for status, headers, body in refused:
        assert (status, json.loads(body)) == (400, {"error": expected}) and "location" not in headers
    assert (twice[0], json.loads(twice[2])) == (400, {"error": "header Host given 2 times: a request names one host"})
    assert served[0] == 200


def test_every_answer_says_nosniff_and_the_page_runs_only_its_own_script_and_style_unframed():
    app = _digits_app()

    async def main():
        return [await asgi_request(app, path) for path in ("/", "/docs", "/v2/health/live", "/no/such/route")]

    (page, headers, body), (_, docs_headers, docs), *others = run(main(), seconds=60)
    for _, answer_headers, _ in [(page, headers, body), (0, docs_headers, docs), *others]:
        assert answer_headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == docs_headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in docs_headers["content-security-policy"]
    policy = dict(part.split(" ", 1) for part in headers["content-security-policy"].split("; "))
    text = body.decode()
    for element in ("script", "style"):
        [inline] = re.findall(rf"<{element}>(.*?)</{element}>", text, flags=re.DOTALL)
        digest = base64.b64encode(hashlib.sha256(inline.encode()).digest()).decode()
        assert policy[f"{element}-src"] == f"'sha256-{digest}'"
    markup = re.sub(r"<(script|style)>.*?</\1>", "", text, flags=re.DOTALL)
    assert not re.search(r"<[^>]*\s(style|on[a-z]+)=", markup)  # an inline attribute the policy would block
    assert (policy["default-src"], policy["connect-src"], policy["frame-ancestors"]) == ("'none'", "'self'", "'none'")
    assert b"swagger-ui-dist@5.35.0/swagger-ui-bundle.js" in docs


def test_head_answers_every_get_route_with_its_headers_and_no_body():
    """``HEAD`` gets what ``GET`` gets (status, headers: the security headers and the length included) without
    the body; a route that takes no ``GET`` answers ``HEAD`` as it answers ``GET``."""
    app = _digits_app()
    paths = ["/", "/docs", "/openapi.json", "/v2/health/live", "/v2/health/ready", "/v2/models/digits", "/metrics"]

    async def main():
        async with app.router.lifespan_context(app):
            await _ready(app)
            answers = {}
            for path in [*paths, "/v2/models/digits/infer"]:
                answers[path] = (await asgi_request(app, path, "HEAD"), await asgi_request(app, path))
            answers["OPTIONS"] = await asgi_request(app, "/v2/health/live", "OPTIONS")  # round 9: Allow lacked HEAD
            return answers

    answers = run(main(), seconds=60)
    for path in paths:
        (status, headers, body), (get_status, get_headers, get_body) = answers[path]
        if path == "/metrics":  # its counters moved between the two requests
            headers.pop("content-length"), get_headers.pop("content-length")
        assert (status, headers, body) == (200, get_headers, b"") and get_status == 200 and get_body, path
    for path in ("/", "/docs"):
        headers = answers[path][0][1]
        assert headers["x-frame-options"] == "DENY" and "frame-ancestors 'none'" in headers["content-security-policy"]
        assert headers["x-content-type-options"] == "nosniff"
    assert int(answers["/"][0][1]["content-length"]) == len(answers["/"][1][2])
    (status, headers, body), (get_status, _, _) = answers["/v2/models/digits/infer"]
    assert (status, headers["allow"], body) == (405, "POST", b"") and get_status == 405
    status, headers, _ = answers["OPTIONS"]
    assert (status, headers["allow"]) == (405, "GET, HEAD")  # every method the route takes (RFC 9110, 10.2.1)


def test_an_inference_request_skips_the_wrapper_that_adds_head_to_a_405s_allow(monkeypatch):
    """Only FastAPI's routes take ``GET``, so only their 405s can need ``HEAD`` in ``Allow``: the inference
    route (405: ``Allow: POST``) is answered ahead of that wrapper, its requests without a wrapped ``send``
    (0.49 us of CPU a call in a loop; ``benchmarks/bench_head_wrapper.py``); every FastAPI request still gets it."""
    from trainfer.server import head

    wrapped = []
    allowing_head = head._allowing_head
    monkeypatch.setattr(head, "_allowing_head", lambda send: wrapped.append(send) or allowing_head(send))
    app = _digits_app()
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0] * 64}]})

    async def main():
        async with app.router.lifespan_context(app):
            await _ready(app)
            wrapped.clear()
            infer = await asgi_request(app, "/v2/models/digits/infer", "POST", body.encode())
            after_infer = len(wrapped)
            live = await asgi_request(app, "/v2/health/live")
            return infer[0], after_infer, live[0], len(wrapped)

    assert run(main(), seconds=60) == (200, 0, 200, 1)


def test_workers_check_the_host_and_take_allowed_hosts(tmp_path):
    """``--workers N`` builds each worker's app from the settings its parent passes on: the rule too."""
    bundle = save_bundle(tmp_path / "tiny", seed=0)
    with running_server(str(bundle), "--workers", "2", "--allowed-hosts", "api.example.com") as server:
        url = f"{server.url}/v2/models"
        assert get(url, headers={"Host": EVIL.decode()})[0] == 400
        assert get(url, headers={"Host": "api.example.com:443"})[0] == 200
        assert get(url)[0] == 200  # 127.0.0.1:PORT
