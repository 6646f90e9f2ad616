"""HTTP front of the edge service, without Ray: every malformed request gets a JSON 4xx, never a
5xx, and the service answers the next good request normally.

Duplicate JSON keys are rejected (400): parsers disagree on which value wins, so accepting them
would let a proxy and this service see different requests.
"""

import asyncio
import json

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from tanbr_ray.cluster import api as api_mod
from tanbr_ray.cluster.api import ApiSettings, make_api

GOOD = {"text_a": "a fine film", "head": "SST-2"}
GOOD_PAIR = {"text_a": "A man sleeps.", "text_b": "Someone rests.", "head": "MNLI", "node": "dc-0"}
JSON_CT = {"Content-Type": "application/json"}


class FakeBackend:
    heads = ["SST-2", "MNLI"]
    pair_heads = {"MNLI"}
    nodes = ["board-0", "dc-0"]

    def __init__(self):
        self.calls = []
        self.fail = None
        self.reply = None
        self.healthy = True

    async def infer(self, head, text_a, text_b, node):
        self.calls.append((head, text_a, text_b, node))
        if self.fail is not None:
            raise self.fail
        return self.reply or {"label": 1, "node": node or "board-0", "model_version": 3}

    async def state(self):
        if self.fail is not None:
            raise self.fail
        return {"version": 3, "nodes": {"board-0": {"x": [0.5, 0.5], "version": 3, "psi": [0.7, 0.3]}}}

    async def health(self):
        if self.fail is not None:
            raise self.fail
        return {"ok": self.healthy, "nodes": 2}


@pytest.fixture(autouse=True)
def _no_token_in_env(monkeypatch):
    monkeypatch.delenv("TANBR_API_TOKEN", raising=False)


@pytest.fixture
def backend():
    return FakeBackend()


@pytest.fixture
def client(backend):
    return TestClient(make_api(backend))


def _j(obj) -> bytes:
    return json.dumps(obj).encode()


def _chunks(n_bytes, size=4096):
    for _ in range(n_bytes // size):
        yield b" " * size


# (id, request kwargs for client.post, expected status, substring of the error message)
MALFORMED = [
    ("empty-body", dict(content=b""), 400, "empty"),
    ("whitespace-body", dict(content=b"  \n "), 400, "empty"),
    ("invalid-utf8", dict(content=b'{"text_a": "caf\xe9", "head": "SST-2"}'), 400, "utf-8"),
    ("utf16-bom", dict(content=json.dumps(GOOD).encode("utf-16")), 400, "utf-8"),
    ("utf16-le-no-bom", dict(content=json.dumps(GOOD).encode("utf-16-le")), 400, "json"),
    ("utf8-bom", dict(content=b"\xef\xbb\xbf" + _j(GOOD)), 400, "bom"),
    ("truncated-json", dict(content=b'{"text_a": "hi", "head": "SST-2"'), 400, "json"),
    ("trailing-garbage", dict(content=_j(GOOD) + b" x"), 400, "json"),
    ("single-quotes", dict(content=b"{'text_a': 'hi', 'head': 'SST-2'}"), 400, "json"),
    ("raw-control-in-string", dict(content=b'{"text_a": "a\x01b", "head": "SST-2"}'), 400, "json"),
    ("nan", dict(content=b'{"text_a": NaN, "head": "SST-2"}'), 400, "nan"),
    ("infinity", dict(content=b'{"text_a": "x", "head": "SST-2", "node": Infinity}'), 400, "infinity"),
    ("minus-infinity", dict(content=b'{"text_a": -Infinity, "head": "SST-2"}'), 400, "infinity"),
    ("huge-int", dict(content=b'{"text_a": ' + b"9" * 5000 + b', "head": "SST-2"}'), 400, "json"),
    ("duplicate-key", dict(content=b'{"text_a": "x", "text_a": "y", "head": "SST-2"}'), 400, "duplicate"),
    ("bomb-arrays", dict(content=b"[" * 16000), 400, "nesting"),
    ("bomb-objects", dict(content=b'{"a":' * 3000), 400, "nesting"),
    ("bomb-oversize", dict(content=b"[" * 100000), 413, "exceeds 16384 bytes"),
    ("bomb-closed", dict(content=b"[" * 3000 + b"]" * 3000), 400, "nesting"),
    ("nested-5", dict(content=_j({"text_a": [[[["x"]]]], "head": "SST-2"})), 400, "nesting"),
    ("top-list", dict(content=_j(["a fine film", "SST-2"])), 422, "object"),
    ("top-string", dict(content=_j("a fine film")), 422, "object"),
    ("top-number", dict(content=b"42"), 422, "object"),
    ("top-null", dict(content=b"null"), 422, "object"),
    ("top-bool", dict(content=b"true"), 422, "object"),
    ("missing-text_a", dict(content=_j({"head": "SST-2"})), 422, "text_a"),
    ("missing-head", dict(content=_j({"text_a": "x"})), 422, "head"),
    ("empty-object", dict(content=b"{}"), 422, "missing field"),
    ("unknown-field", dict(content=_j({**GOOD, "temperature": 0.5})), 422, "temperature"),
    ("text_a-int", dict(content=_j({**GOOD, "text_a": 5})), 422, "text_a"),
    ("text_a-bool", dict(content=_j({**GOOD, "text_a": True})), 422, "text_a"),
    ("text_a-null", dict(content=_j({**GOOD, "text_a": None})), 422, "text_a"),
    ("text_a-list", dict(content=_j({**GOOD, "text_a": ["x"]})), 422, "text_a"),
    ("text_a-object", dict(content=_j({**GOOD, "text_a": {"t": "x"}})), 422, "text_a"),
    ("text_a-huge-float", dict(content=b'{"text_a": 1e999, "head": "SST-2"}'), 422, "text_a"),
    ("head-int", dict(content=_j({**GOOD, "head": 2})), 422, "head"),
    ("node-int", dict(content=_j({**GOOD, "node": 0})), 422, "node"),
    ("text_b-int", dict(content=_j({**GOOD_PAIR, "text_b": 7})), 422, "text_b"),
    ("text_a-empty", dict(content=_j({**GOOD, "text_a": ""})), 422, "text_a"),
    ("text_a-whitespace", dict(content=_j({**GOOD, "text_a": " \n\t "})), 422, "text_a"),
    ("text_b-whitespace", dict(content=_j({**GOOD_PAIR, "text_b": "   "})), 422, "text_b"),
    ("text_a-too-long", dict(content=_j({**GOOD, "text_a": "x" * 2001})), 422, "text_a is too long"),
    ("text_b-too-long", dict(content=_j({**GOOD_PAIR, "text_b": "y" * 2001})), 422, "text_b is too long"),
    ("text_a-nul", dict(content=_j({**GOOD, "text_a": "a\u0000b"})), 422, "u+0000"),
    ("text_a-bell", dict(content=_j({**GOOD, "text_a": "a\u0007b"})), 422, "text_a"),
    ("text_a-c1-control", dict(content=_j({**GOOD, "text_a": "a\u009bb"})), 422, "text_a"),
    ("text_b-escape", dict(content=_j({**GOOD_PAIR, "text_b": "x\u001b[31m"})), 422, "text_b"),
    ("text_a-lone-surrogate", dict(content=b'{"text_a": "a\\ud800b", "head": "SST-2"}'), 422, "text_a"),
    ("unknown-head", dict(content=_j({**GOOD, "head": "QQP"})), 422, "valid heads: SST-2, MNLI"),
    ("head-wrong-case", dict(content=_j({**GOOD, "head": "sst-2"})), 422, "unknown head"),
    ("unknown-node", dict(content=_j({**GOOD, "node": "board-9"})), 422, "valid nodes: board-0, dc-0"),
    ("empty-node", dict(content=_j({**GOOD, "node": ""})), 422, "unknown node"),
    ("text_b-missing-pair", dict(content=_j({"text_a": "x", "head": "MNLI"})), 422, "text_b is required"),
    ("text_b-null-pair", dict(content=_j({"text_a": "x", "head": "MNLI", "text_b": None})), 422, "text_b"),
    ("text_b-for-single", dict(content=_j({**GOOD, "text_b": "extra"})), 422, "text_b is not accepted"),
    ("oversize-with-length", dict(content=_j({**GOOD, "text_a": "x" * 20000})), 413, "exceeds 16384 bytes"),
    ("oversize-chunked", dict(content=_chunks(40960)), 413, "exceeds 16384 bytes"),
    ("content-type-text", dict(content=_j(GOOD), headers={"Content-Type": "text/plain"}), 415, "content-type"),
    ("content-type-missing", dict(content=_j(GOOD), headers={}), 415, "content-type"),
    ("content-type-form", dict(data={"text_a": "x", "head": "SST-2"}, headers=None), 415, "content-type"),
    ("charset-utf16", dict(content=json.dumps(GOOD).encode("utf-16"),
                           headers={"Content-Type": "application/json; charset=utf-16"}), 415, "charset"),
]


@pytest.mark.parametrize("kwargs,status,needle", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_request_gets_4xx_and_service_keeps_serving(client, backend, kwargs, status, needle):
    kwargs = dict(kwargs)
    if "headers" not in kwargs:
        kwargs["headers"] = JSON_CT
    elif kwargs["headers"] is None:
        del kwargs["headers"]
    r = client.post("/v1/infer", **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert needle.lower() in body["error"].lower()
    assert backend.calls == []  # refused before reaching the model
    ok = client.post("/v1/infer", json=GOOD)
    assert ok.status_code == 200 and ok.json()["label"] == 1


def test_enough_malformed_cases():
    assert len(MALFORMED) >= 30


def test_good_single_and_pair_requests(client, backend):
    r = client.post("/v1/infer", json=GOOD)
    assert r.status_code == 200
    assert r.json() == {"label": 1, "node": "board-0", "model_version": 3}
    r = client.post("/v1/infer", json=GOOD_PAIR, headers={"Content-Type": "Application/JSON; charset=UTF-8"})
    assert r.status_code == 200 and r.json()["node"] == "dc-0"
    # tab/newline are allowed, non-ASCII text passes untouched; explicit null text_b == absent
    r = client.post("/v1/infer", json={**GOOD, "text_a": "naïve\tfilm\n😀", "text_b": None, "node": None})
    assert r.status_code == 200
    assert backend.calls == [("SST-2", "a fine film", None, None),
                             ("MNLI", "A man sleeps.", "Someone rests.", "dc-0"),
                             ("SST-2", "naïve\tfilm\n😀", None, None)]


def test_text_at_exact_limit_is_accepted(client):
    assert client.post("/v1/infer", json={**GOOD, "text_a": "x" * 2000}).status_code == 200


def test_healthz_and_state(client, backend):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json()["ok"] is True
    r = client.get("/v1/state")
    assert r.status_code == 200 and r.json()["nodes"]["board-0"]["version"] == 3
    backend.healthy = False
    r = client.get("/healthz")
    assert r.status_code == 503 and r.json()["ok"] is False


def test_unknown_route_and_method_are_json(client):
    r = client.get("/nope")
    assert r.status_code == 404 and "/nope" in r.json()["error"]
    r = client.get("/v1/infer")
    assert r.status_code == 405 and "GET" in r.json()["error"]
    assert "POST" in r.headers["allow"]
    r = client.post("/healthz", json={})
    assert r.status_code == 405 and set(r.json()) == {"error"}


def test_auth(backend, monkeypatch):
    monkeypatch.setenv("TANBR_API_TOKEN", "s3cret-token")
    c = TestClient(make_api(backend))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-token"},
                    {"Authorization": "Bearer "}, {"Authorization": "s3cret-token"}):
        for r in (c.post("/v1/infer", json=GOOD, headers=headers), c.get("/v1/state", headers=headers)):
            assert r.status_code == 401, headers
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert "token" in r.json()["error"]
    assert backend.calls == []
    good = {"Authorization": "Bearer s3cret-token"}
    assert c.post("/v1/infer", json=GOOD, headers=good).status_code == 200
    assert c.post("/v1/infer", json=GOOD, headers={"Authorization": "bearer s3cret-token"}).status_code == 200
    assert c.get("/v1/state", headers=good).status_code == 200
    assert c.get("/healthz").status_code == 200


def test_auth_token_env_is_configurable_and_read_at_build_time(backend, monkeypatch):
    monkeypatch.setenv("EDGE_TOKEN", "abc")
    c = TestClient(make_api(backend, ApiSettings(token_env="EDGE_TOKEN")))
    assert c.post("/v1/infer", json=GOOD).status_code == 401
    assert c.post("/v1/infer", json=GOOD, headers={"Authorization": "Bearer abc"}).status_code == 200
    open_client = TestClient(make_api(backend))
    monkeypatch.setenv("TANBR_API_TOKEN", "late")  # set after make_api: no effect
    assert open_client.post("/v1/infer", json=GOOD).status_code == 200


def test_rate_limit(backend, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(api_mod, "_clock", lambda: now[0])
    c = TestClient(make_api(backend, ApiSettings(rate_limit_per_s=1, rate_burst=2)))
    assert c.post("/v1/infer", json=GOOD).status_code == 200
    assert c.get("/v1/state").status_code == 200
    r = c.post("/v1/infer", json=GOOD)
    assert r.status_code == 429 and "rate limit" in r.json()["error"]
    assert int(r.headers["retry-after"]) >= 1
    assert c.get("/healthz").status_code == 200  # probes are never limited
    now[0] += 1.0  # one token refilled
    assert c.post("/v1/infer", json=GOOD).status_code == 200
    assert c.post("/v1/infer", json=GOOD).status_code == 429
    assert len(backend.calls) == 2


def test_unauthenticated_requests_do_not_drain_rate_budget(backend, monkeypatch):
    monkeypatch.setenv("TANBR_API_TOKEN", "t")
    now = [0.0]
    monkeypatch.setattr(api_mod, "_clock", lambda: now[0])
    c = TestClient(make_api(backend, ApiSettings(rate_limit_per_s=1, rate_burst=1)))
    for _ in range(5):
        assert c.post("/v1/infer", json=GOOD).status_code == 401
    assert c.post("/v1/infer", json=GOOD, headers={"Authorization": "Bearer t"}).status_code == 200


@pytest.mark.parametrize("exc,status,needle", [
    (ValueError("node board-0 has no expert for MNLI"), 422, "no expert for MNLI"),
    (ValueError(), 422, "invalid request"),
    (RuntimeError("actor died"), 503, "backend unavailable: RuntimeError: actor died"),
    (TimeoutError("slow"), 503, "backend unavailable: TimeoutError"),
    (asyncio.TimeoutError(), 503, "backend unavailable"),
    (KeyError("x"), 503, "backend unavailable"),
])
def test_backend_errors(client, backend, exc, status, needle):
    backend.fail = exc
    r = client.post("/v1/infer", json=GOOD)
    assert r.status_code == status and needle in r.json()["error"]
    backend.fail = None
    assert client.post("/v1/infer", json=GOOD).status_code == 200


def test_backend_failures_on_state_health_and_bad_replies(client, backend):
    backend.fail = RuntimeError("down")
    assert client.get("/v1/state").status_code == 503
    r = client.get("/healthz")
    assert r.status_code == 503 and "down" in r.json()["error"]
    backend.fail = None
    backend.reply = {"score": float("nan"), "node": "board-0", "model_version": 3}
    r = client.post("/v1/infer", json=GOOD)
    assert r.status_code == 503 and "unserialisable" in r.json()["error"]


def test_bad_requests_do_not_disturb_concurrent_good_ones(backend):
    async def main():
        transport = httpx.ASGITransport(app=make_api(backend, ApiSettings(rate_burst=1000)))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            bad = [c.post("/v1/infer", content=b"[" * 16000, headers=JSON_CT) for _ in range(20)]
            bad += [c.post("/v1/infer", json={**GOOD, "text_a": 5}) for _ in range(20)]
            good = [c.post("/v1/infer", json=GOOD) for _ in range(40)]
            return await asyncio.gather(*bad, *good)
    rs = asyncio.run(main())
    assert [r.status_code for r in rs] == [400] * 20 + [422] * 20 + [200] * 40


def test_wrapped_cause_is_reported():
    """Ray's RayTaskError subclasses the user's exception and keeps it as ``.cause``."""
    class Wrapped(ValueError):
        def __init__(self, cause):
            super().__init__("Traceback (most recent call last): ...long remote traceback...")
            self.cause = cause
    b = FakeBackend()
    b.fail = Wrapped(ValueError("unknown expert"))
    r = TestClient(make_api(b)).post("/v1/infer", json=GOOD)
    assert r.status_code == 422 and r.json() == {"error": "unknown expert"}


def _raw_asgi(app, headers, body_chunk=b" " * 512):
    """Drive the ASGI app directly with an endless body, to see how much of it gets read."""
    pulled, sent = [0], []

    async def receive():
        pulled[0] += 1
        return {"type": "http.request", "body": body_chunk, "more_body": True}

    async def send(msg):
        sent.append(msg)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/infer", "raw_path": b"/v1/infer", "query_string": b"",
             "root_path": "", "headers": headers, "client": ("test", 1), "server": ("test", 80)}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body), pulled[0]


def test_body_stream_stops_once_over_limit(backend):
    app = make_api(backend, ApiSettings(max_body_bytes=1024))
    ct = (b"content-type", b"application/json")
    # a lying Content-Length and no Content-Length: both stop after ~limit bytes of an endless body
    for headers in ([ct, (b"content-length", b"10")], [ct]):
        status, body, pulled = _raw_asgi(app, headers)
        assert status == 413 and "1024 bytes" in body["error"]
        assert pulled <= 3
    # an honest but too large Content-Length: refused before reading anything
    status, _, pulled = _raw_asgi(app, [ct, (b"content-length", b"999999999999999999999")])
    assert status == 413 and pulled == 0
    status, body, _ = _raw_asgi(app, [ct, (b"content-length", b"12abc")])
    assert status == 400 and "content-length" in body["error"].lower()


@pytest.mark.parametrize("bomb", [b"[" * 100000, b'{"a":' * 200000, b"[" * 900 + b"]" * 900,
                                  b'{"text_a": ' + b"[" * 500000 + b"]" * 500000 + b', "head": "SST-2"}'])
def test_json_bombs_under_a_large_body_limit(backend, bomb):
    """With the size limit raised, nesting is still refused (RecursionError or depth check)."""
    c = TestClient(make_api(backend, ApiSettings(max_body_bytes=2_000_000)))
    r = c.post("/v1/infer", content=bomb, headers=JSON_CT)
    assert r.status_code == 400 and "nesting" in r.json()["error"]
    assert c.post("/v1/infer", json=GOOD).status_code == 200


def test_settings_validation():
    for bad in (dict(max_body_bytes=10), dict(max_body_bytes=10**8), dict(max_text_chars=0),
                dict(rate_limit_per_s=0), dict(rate_limit_per_s=float("inf")), dict(rate_burst=0),
                dict(token_env=""), dict(typo=1)):
        with pytest.raises(ValidationError):
            ApiSettings(**bad)
    assert ApiSettings().max_body_bytes == 16384


def test_fastapi_validation_errors_are_error_shaped(backend):
    """Routes added later with typed params must keep the {"error": ...} shape."""
    app = make_api(backend)

    @app.get("/v1/echo")
    async def echo(n: int):
        return {"n": n}

    c = TestClient(app)
    r = c.get("/v1/echo", params={"n": "x"})
    assert r.status_code == 422 and set(r.json()) == {"error"} and "n" in r.json()["error"]
