"""Plain ASGI middleware (no BaseHTTPMiddleware, so streamed responses pass through untouched).

RequestContext gives every request an id (the client's `x-request-id` if it sent one), returns it as a header on
every response, puts it in the log context (mlxk.logs), and records activity for the idle exit. BodyLimit answers
413 before a handler reads an oversized body, whether the client declared its length or streams it chunked.
CrossSiteGuard refuses what a web page on another site (or a DNS-rebound name) could make a browser send.
"""
from __future__ import annotations

import json
import logging
import re
import secrets
import time
from urllib.parse import urlsplit

from mlxk import logs
from mlxk.errors import MlxkError
from mlxk.server.errors import BodyTooLarge, CrossSiteRefused, InternalError, MisdirectedHost, \
    UnsupportedMediaType, error_body

log = logging.getLogger("mlxk.server.middleware")

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

        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", rid.encode()))
                message = {**message, "headers": headers}
            await send(message)

        if scope["path"] == "/health":
            state = None   # a probe is not use: `mlxk processes` or a monitor must not keep an idle server alive
        if state is not None:
            state.active_requests += 1
            state.last_activity = time.monotonic()
        token = logs.request_id.set(rid)
        try:
            await self.app(scope, receive, send_with_id)
        except Exception as error:  # a bug that escaped the app's handlers: answer here, keep the connection
            if started:  # mid-response nothing can be said any more; the server closes the connection
                raise
            # Starlette's outer ServerErrorMiddleware would answer 500 and re-raise, and uvicorn then drops the
            # keep-alive connection under the client's next request.
            log.error("unhandled error in %s %s", scope.get("method"), scope.get("path"), exc_info=error)
            await send_error(send_with_id, InternalError(
                f"internal server error: {type(error).__name__}; see the server log"), scope)
        finally:
            logs.request_id.reset(token)
            if state is not None:
                state.active_requests -= 1
                state.last_activity = time.monotonic()


async def send_error(send, error: MlxkError, scope: dict) -> None:
    """Answer with `error` in its route's dialect's shape, from middleware (before any route or exception handler
    ran)."""
    rid = (scope.get("state") or {}).get("request_id", "")
    body = json.dumps(error_body(scope.get("path", ""), error, rid)).encode()
    await send({"type": "http.response.start", "status": error.http_status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await send_error(send, BodyTooLarge(self._message(int(declared))), scope)
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


LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})
WILDCARD_BINDS = frozenset({"0.0.0.0", "::", "[::]", ""})
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _host_name(host: str) -> str:
    """`Host` header value without its port: "localhost:8000" -> "localhost", "[::1]:80" -> "[::1]"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


NON_BROWSER_FETCH_SITES = frozenset({"same-origin", "none"})


def _from_browser(headers: dict) -> bool:
    """Whether a request may come from a web page: it has an `Origin`, or a `Sec-Fetch-Site` other than
    same-origin/none (browsers send both on cross-origin writes: Fetch spec, "append a request `Origin` header" and
    the Fetch Metadata spec). curl, the SDKs and scripts send neither."""
    site = headers.get(b"sec-fetch-site")
    return b"origin" in headers or (site is not None and site.strip().lower() not in NON_BROWSER_FETCH_SITES)


def _bodyless_delete(scope, headers: dict) -> bool:
    """A DELETE that declares no body (no Content-Length or 0, not chunked): there is nothing to type."""
    return scope["method"] == "DELETE" and headers.get(b"content-length", "0").strip() in ("", "0") \
        and b"transfer-encoding" not in headers


class CrossSiteGuard:
    """Refuse requests a browser could be tricked into sending (the server has no cookies, but a keyless local
    server needs none: any page the user visits could otherwise POST to it).

    - Host: must name a loopback address (`localhost`, `127.0.0.1`, `[::1]`, any port), the bound host, or one of
      MLXK_ALLOWED_HOSTS; else 421. This stops DNS rebinding (a page whose own name now resolves to 127.0.0.1).
      With an API key and a wildcard bind (0.0.0.0, ::) any Host is answered: the key is the protection there.
    - POST/PUT/PATCH/DELETE from a browser need `Content-Type: application/json` (415): an HTML form can only
      send text/plain, urlencoded or multipart without a CORS preflight, which a JSON content type forces. A
      browser is told by its headers (Fetch spec): it sends `Origin` on every cross-origin POST/PUT/PATCH/DELETE
      and `Sec-Fetch-Site` on every request. A request with neither (or with `Sec-Fetch-Site: same-origin` or
      `none` and no Origin) comes from curl, an SDK or a script, which no web page can drive: its body is read as
      JSON whatever its content type (`curl -d '{...}'` sends application/x-www-form-urlencoded, as Ollama's own
      examples do). A DELETE with no body never needs a content type (a cross-origin DELETE is preflighted).
    - POST/PUT/PATCH/DELETE with an `Origin` header need that origin to be this server's own (same scheme-less
      host and port as Host) or one of MLXK_CORS_ORIGINS (403); a missing Origin is a non-browser client.
    """

    def __init__(self, app, *, bind_host: str, api_key: bool, allowed_hosts=(), allowed_origins=()):
        self.app = app
        bind = bind_host.strip().lower()
        self.any_host = (api_key and bind in WILDCARD_BINDS) or "*" in allowed_hosts
        bracketed = f"[{bind}]" if ":" in bind and not bind.startswith("[") else bind
        self.hosts = LOOPBACK_NAMES | {bind, bracketed} | {_host_name(h) for h in allowed_hosts}
        self.origins = frozenset(o.rstrip("/").lower() for o in allowed_origins)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        error = self.refusal(scope)
        if error is not None:
            return await send_error(send, error, scope)
        await self.app(scope, receive, send)

    def refusal(self, scope) -> MlxkError | None:
        headers = {}
        for key, value in scope.get("headers") or []:
            headers.setdefault(key.lower(), value.decode("latin-1"))
        host = headers.get(b"host")
        if host is not None and not self.any_host and _host_name(host) not in self.hosts:
            return MisdirectedHost(
                f"this server does not answer for the host name {host!r} (a page on another site may be reaching "
                "it through DNS rebinding); use http://127.0.0.1 or http://localhost, or add the name to "
                "MLXK_ALLOWED_HOSTS")
        if scope["method"] not in STATE_CHANGING:
            return None
        media_type = headers.get(b"content-type", "").split(";", 1)[0].strip().lower()
        if media_type != "application/json" and _from_browser(headers) and not _bodyless_delete(scope, headers):
            return UnsupportedMediaType(
                f"{scope['method']} {scope['path']} needs 'Content-Type: application/json' (got "
                f"{media_type or 'none'}); send the body as JSON with that header (curl: -H 'content-type: "
                "application/json' -d '{}')")
        origin = headers.get(b"origin")
        if origin is not None and not self._origin_allowed(origin, host):
            return CrossSiteRefused(
                f"cross-site request refused: Origin {origin!r} is not this server; add it to MLXK_CORS_ORIGINS "
                "to allow a web page on that site to use the API")
        return None

    def _origin_allowed(self, origin: str, host: str | None) -> bool:
        origin = origin.strip().rstrip("/").lower()
        if origin in self.origins or "*" in self.origins:
            return True
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc or host is None:
            return False  # "null" (a sandboxed frame, a file:// page) is nobody's origin
        default_port = {"http": 80, "https": 443}[parts.scheme]
        netloc = parts.netloc.removesuffix(f":{default_port}")
        return netloc == host.strip().lower().removesuffix(f":{default_port}")
