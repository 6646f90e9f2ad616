"""HTTP front of the edge inference service, as a plain FastAPI app (no Ray import).

Kept Ray-free so that every validation rule can be tested with ``TestClient`` and a fake backend;
the Serve ingress deployment wraps it (``serve.ingress()`` + ``__serve_build_asgi_app__`` returning
``make_api(backend, settings)``).

The body of ``POST /v1/infer`` is parsed here, not by FastAPI, so that hostile input is refused
cheaply and with a 4xx before it costs memory or reaches a model:

====  ==========================================================================================
401   ``/v1/*`` without the right ``Authorization: Bearer`` token (only when the token env var is
      set); checked first, so unauthenticated floods do not drain the shared rate budget
429   global token bucket exceeded (``Retry-After`` set); ``/healthz`` is never limited
415   Content-Type not ``application/json`` (a ``charset`` other than utf-8 included)
413   body over ``max_body_bytes``, by Content-Length or by the bytes actually streamed
400   body not decodable: empty, invalid UTF-8 (UTF-16 included), invalid JSON, NaN/Infinity,
      duplicate keys (ambiguous: parsers disagree on which wins), nesting deeper than 4
422   decodable but wrong: top level not an object, unknown/missing fields, wrong types (strict:
      no coercion), empty/whitespace-only text, text over ``max_text_chars`` (a field limit, so
      422 rather than 413), control characters other than tab/newline, lone surrogates, unknown
      head or node, text_b missing for a pair head or present for a single-sentence one, and a
      ``ValueError`` raised by the backend
503   any other backend failure (timeouts included) or an unserialisable backend reply: the fault
      is the service's, not the request's
====  ==========================================================================================

Every error body is ``{"error": "<message>"}``, 404/405 included.
"""

from __future__ import annotations

import hmac
import json
import math
import os
import re
import time
from typing import Any, Awaitable, Callable, Protocol

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

MAX_JSON_DEPTH = 4
_clock = time.monotonic  # module-level so tests can drive the rate limiter without sleeping
# C0 controls except tab/newline, DEL, C1 controls, and lone surrogates (unencodable downstream).
_BAD_CHARS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number",
               bool: "boolean", type(None): "null"}


class ApiSettings(BaseModel):
    """Limits of the HTTP front; ranges are validated so a typo cannot disable a limit."""

    model_config = ConfigDict(extra="forbid")
    token_env: str = Field("TANBR_API_TOKEN", min_length=1)
    max_body_bytes: int = Field(16384, ge=64, le=10_000_000)
    max_text_chars: int = Field(2000, ge=1, le=100_000)
    rate_limit_per_s: float = Field(200.0, gt=0, allow_inf_nan=False)
    rate_burst: int = Field(400, ge=1)


class InferBackend(Protocol):
    """What the app needs from the serving side (a Serve handle wrapper, or a fake in tests).

    ``heads``/``nodes`` are read per request, so a backend may change them at run time.
    """

    heads: list[str]
    pair_heads: set[str]
    nodes: list[str]

    async def infer(self, head: str, text_a: str, text_b: str | None, node: str | None) -> dict: ...
    async def state(self) -> dict: ...
    async def health(self) -> dict: ...


class _InferBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    text_a: str
    head: str
    text_b: str | None = None
    node: str | None = None


def _short(value: Any, n: int = 60) -> str:
    """Echo client input back in messages only truncated: error bodies must stay small."""
    s = str(value)
    return s if len(s) <= n else s[:n] + "..."


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _describe(errors: list[dict]) -> str:
    """Pydantic/FastAPI error list -> one line naming each offending field (no input echoed)."""
    parts = []
    for e in errors:
        field = _short(".".join(str(p) for p in e.get("loc", ())) or "body")
        if e.get("type") == "extra_forbidden":
            parts.append(f"unknown field '{field}'")
        elif e.get("type") == "missing":
            parts.append(f"missing field '{field}'")
        else:
            parts.append(f"{field}: {e.get('msg')}")
    return "; ".join(parts) or "invalid request"


def _no_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} is not allowed")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key '{_short(k)}'")
        out[k] = v
    return out


def _too_deep(obj: Any) -> bool:
    """Iterative (never recursive) nesting check on an already-parsed document."""
    stack = [(obj, 1)]
    while stack:
        o, depth = stack.pop()
        if isinstance(o, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                return True
            stack.extend((v, depth + 1) for v in (o.values() if isinstance(o, dict) else o))
    return False


async def _read_json(request: Request, limit: int) -> Any:
    """Content-Type, size (header and streamed bytes), UTF-8 and JSON checks, in that order."""
    media, *params = [p.strip().lower() for p in request.headers.get("content-type", "").split(";")]
    if media != "application/json":
        raise HTTPException(415, "Content-Type must be application/json")
    for p in params:
        key, _, val = p.partition("=")
        if key.strip() == "charset" and val.strip().strip('"') not in ("utf-8", "utf8"):
            raise HTTPException(415, "Content-Type charset must be utf-8")
    too_big = f"body exceeds {limit} bytes"
    length = request.headers.get("content-length")
    if length is not None:
        if not (length.isascii() and length.isdigit()):
            raise HTTPException(400, "invalid Content-Length header")
        if len(length.lstrip("0")) > 12 or int(length) > limit:
            raise HTTPException(413, too_big)
    chunks, size = [], 0
    async for chunk in request.stream():  # a lying or absent Content-Length is caught here
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, too_big)
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise HTTPException(400, "empty body; expected a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HTTPException(400, f"body is not valid UTF-8 (bad byte at offset {e.start})") from None
    try:
        obj = json.loads(text, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except RecursionError:  # the C scanner recurses; a '[' * 100000 bomb lands here
        raise HTTPException(400, f"JSON nesting too deep (max {MAX_JSON_DEPTH})") from None
    except ValueError as e:  # JSONDecodeError, NaN/Infinity, duplicate keys, >4300-digit ints
        raise HTTPException(400, f"body is not valid JSON: {_short(e, 120)}") from None
    if _too_deep(obj):
        raise HTTPException(400, f"JSON nesting too deep (max {MAX_JSON_DEPTH})")
    if not isinstance(obj, dict):
        raise HTTPException(422, f"JSON body must be an object, got {_JSON_TYPES.get(type(obj))}")
    return obj


def _check_text(name: str, value: str, max_chars: int) -> None:
    if not value.strip():
        raise HTTPException(422, f"{name} must be a non-empty, non-whitespace string")
    if len(value) > max_chars:
        raise HTTPException(422, f"{name} is too long ({len(value)} > {max_chars} characters)")
    if m := _BAD_CHARS.search(value):
        raise HTTPException(422, f"{name} contains a forbidden character U+{ord(m.group()):04X}")


def _parse_infer(obj: dict, backend: InferBackend, max_chars: int) -> _InferBody:
    try:
        body = _InferBody.model_validate(obj)
    except ValidationError as e:
        raise HTTPException(422, _describe(e.errors(include_url=False, include_input=False))) from None
    heads, nodes = list(backend.heads), list(backend.nodes)
    if body.head not in heads:
        raise HTTPException(422, f"unknown head '{_short(body.head)}'; valid heads: {', '.join(heads)}")
    if body.node is not None and body.node not in nodes:
        raise HTTPException(422, f"unknown node '{_short(body.node)}'; valid nodes: {', '.join(nodes)}")
    _check_text("text_a", body.text_a, max_chars)
    pair = body.head in backend.pair_heads
    if pair and body.text_b is None:
        raise HTTPException(422, f"text_b is required for sentence-pair head '{body.head}'")
    if not pair and body.text_b is not None:
        raise HTTPException(422, f"text_b is not accepted for single-sentence head '{body.head}'")
    if body.text_b is not None:
        _check_text("text_b", body.text_b, max_chars)
    return body


def _failure(e: BaseException) -> str:
    """Message of a backend failure; Ray's RayTaskError carries the original as ``.cause``."""
    e = getattr(e, "cause", None) or e
    return _short(f"{type(e).__name__}: {e}", 300)


async def _call(fn: Callable[[], Awaitable[Any]], status_ok: Callable[[Any], bool] = lambda r: True):
    """Await a backend call: ValueError -> 422 (the request was bad), anything else -> 503."""
    try:
        result = await fn()  # fn() inside the try: a sync failure building the call counts too
    except ValueError as e:
        return _error(422, _short(getattr(e, "cause", None) or e, 300) or "invalid request")
    except Exception as e:
        return _error(503, f"backend unavailable: {_failure(e)}")
    try:
        return JSONResponse(result, status_code=200 if status_ok(result) else 503)
    except Exception as e:  # NaN scores, non-JSON types: the backend's fault, not the client's
        return _error(503, f"backend unavailable: unserialisable reply ({_failure(e)})")


def make_api(backend: InferBackend, settings: ApiSettings | None = None) -> FastAPI:
    """Build the app; the API token is read from ``settings.token_env`` now, not per request."""
    s = settings or ApiSettings()
    token = os.environ.get(s.token_env, "")
    bucket = {"tokens": float(s.rate_burst), "stamp": _clock()}
    app = FastAPI(title="tanbr_ray edge inference")

    async def gate(request: Request) -> None:
        """Auth, then rate limit. Async so it runs on the event loop: no races on the bucket."""
        if token:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not given.strip():
                raise HTTPException(401, "missing bearer token", {"WWW-Authenticate": "Bearer"})
            if not hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"),
                                       token.encode("utf-8", "surrogateescape")):
                raise HTTPException(401, "invalid bearer token",
                                    {"WWW-Authenticate": 'Bearer error="invalid_token"'})
        now = _clock()
        bucket["tokens"] = min(s.rate_burst, bucket["tokens"] + (now - bucket["stamp"]) * s.rate_limit_per_s)
        bucket["stamp"] = now
        if bucket["tokens"] < 1:
            wait = (1 - bucket["tokens"]) / s.rate_limit_per_s
            raise HTTPException(429, "rate limit exceeded", {"Retry-After": str(max(1, math.ceil(wait)))})
        bucket["tokens"] -= 1

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = str(exc.detail)
        if exc.status_code in (404, 405):  # only routing raises these here
            msg = f"{msg}: {request.method} {_short(request.url.path)}"
        return _error(exc.status_code, msg, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, _describe(list(exc.errors())))

    @app.post("/v1/infer")
    async def infer(request: Request):
        await gate(request)
        body = _parse_infer(await _read_json(request, s.max_body_bytes), backend, s.max_text_chars)
        return await _call(lambda: backend.infer(body.head, body.text_a, body.text_b, body.node))

    @app.get("/v1/state")
    async def state(request: Request):
        await gate(request)
        return await _call(backend.state)

    @app.get("/healthz")
    async def healthz():
        """No auth and no rate limit: load balancers and readiness probes must always get through."""
        return await _call(backend.health, lambda r: isinstance(r, dict) and bool(r.get("ok")))

    return app
