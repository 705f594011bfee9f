"""Plain ASGI middleware (no BaseHTTPMiddleware, so streamed responses pass through untouched).

RequestContext gives every request an id (the client's `x-request-id` if it sent one), returns it as a header on
every response, and records activity for the idle exit. BodyLimit answers 413 before a handler reads an
oversized body, whether the client declared its length or streams it chunked.
"""
from __future__ import annotations

import json
import re
import secrets
import time

from mlxk.server.errors import BodyTooLarge, openai_error_body

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestContext:
    def __init__(self, app, get_state):
        self.app = app
        self.get_state = get_state  # () -> ServerState | None (None before the lifespan ran)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        sent = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        rid = sent if _SAFE_ID.match(sent) else f"req-{secrets.token_hex(8)}"
        scope.setdefault("state", {})["request_id"] = rid
        state = self.get_state()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", rid.encode()))
                message = {**message, "headers": headers}
            await send(message)

        if scope["path"] == "/health":
            state = None   # a probe is not use: `mlxk processes` or a monitor must not keep an idle server alive
        if state is not None:
            state.active_requests += 1
            state.last_activity = time.monotonic()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if state is not None:
                state.active_requests -= 1
                state.last_activity = time.monotonic()


class BodyLimit:
    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json")]})
            error = BodyTooLarge(self._message(int(declared)))
            await send({"type": "http.response.body", "body": json.dumps(openai_error_body(error)).encode()})
            return
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self._message(seen))
            return message

        await self.app(scope, counted_receive, send)

    def _message(self, size: int) -> str:
        return (f"the request body ({size} bytes) is larger than the server's limit of {self.limit} bytes "
                "(MLXK_MAX_BODY_BYTES)")
