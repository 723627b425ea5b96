"""The HTTP edge of `lmlab serve`: the API key, the body limit, JSON reading and OpenAI-shaped errors.

Pure ASGI middleware (not Starlette's BaseHTTPMiddleware, which buffers streamed responses) checks the
key before any route runs and counts every response in the metrics.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from lmlab.serve.protocol import ApiError

OPEN_PATHS = {"/health"}
# The chat page itself is static HTML with no model access; it asks for the key and sends it with
# every API call, which is where the key is checked. Serving it openly is what makes it usable.
PAGE_PATHS = {"/", "/favicon.ico"}


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


class Guard:
    """API key check (constant-time) and request counting around the app."""

    def __init__(self, app: Any, *, api_key: str | None, metrics: Any):
        self.app, self.key, self.metrics = app, (api_key or "").encode(), metrics

    def _authorized(self, scope: dict) -> bool:
        if not self.key or scope["path"] in OPEN_PATHS or (scope["path"] in PAGE_PATHS and scope["method"] == "GET"):
            return True
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        # compare_digest on bytes of any length: no early exit that would time the key's prefix
        return hmac.compare_digest(given.strip(), self.key) and scheme.lower() == b"bearer"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def counted_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        route = scope["path"] if scope["path"] in KNOWN_ROUTES else "other"
        try:
            if not self._authorized(scope):
                err = ApiError(401, "missing or wrong API key (send it as 'Authorization: Bearer KEY')",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await error_response(err)(scope, receive, counted_send)
                return
            await self.app(scope, receive, counted_send)
        finally:
            self.metrics.requests.labels(route, str(status[0])).inc()


KNOWN_ROUTES = {"/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions",
                "/tokenize", "/detokenize", "/tokenizer_info"}


async def read_json(request: Request, limit: int) -> Any:
    """The request's JSON body, refusing a wrong content type, and a body over `limit` bytes before it
    is read whole: at once from Content-Length, else (chunked) as soon as the bytes received pass it."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ApiError(415, f"the body must be JSON (Content-Type: application/json), not '{ctype or 'none'}'",
                       code="unsupported_media_type")
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise ApiError(413, f"the body is over the limit of {limit} bytes", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the body is over the limit of {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise ApiError(400, "the request body is empty; send a JSON object", code="empty_body")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: deep nesting
        raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
