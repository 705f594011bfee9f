"""What handlers depend on: the server's state, auth, the request id, parsed bodies, resolved models.

Handlers take these as typed FastAPI dependencies; tests swap them through `app.dependency_overrides` only where
a real part cannot run.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import sqlite3
import time
from dataclasses import dataclass, field, replace
from typing import Annotated, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel, ValidationError

from mlxk.config import Settings, settings as load_settings
from mlxk.errors import MlxkError
from mlxk import catalog
from mlxk.server.errors import InvalidRequest, Unauthorized
from mlxk.server.metrics import Metrics
from mlxk.server.supervisor import Supervisor, WorkerOptions

log = logging.getLogger("mlxk.server.deps")

CATALOG_TTL_S = 1.0  # resolutions within this window reuse one index refresh (bursts of parallel requests)


@dataclass(frozen=True)
class ServerConfig:
    """Settings plus what `mlxk serve` was told on its command line."""
    settings: Settings
    host: str
    port: int
    api_key: str | None
    max_loaded: int
    keep_alive_s: float
    idle_exit_s: float | None = None    # exit after this long without a request (servers `mlxk run` starts)

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **overrides) -> "ServerConfig":
        s = settings or load_settings()
        config = cls(settings=s, host=s.host, port=s.port, api_key=s.api_key, max_loaded=s.max_loaded,
                     keep_alive_s=s.keep_alive_s)
        return replace(config, **{k: v for k, v in overrides.items() if v is not None})

    def worker_options(self) -> WorkerOptions:
        s = self.settings
        return WorkerOptions(socket=s.inference_socket, max_loaded=self.max_loaded, keep_alive_s=self.keep_alive_s,
                             max_waiting=s.max_waiting, max_prompt_tokens=s.max_prompt_tokens,
                             external=s.inference_external, timeout_s=s.worker_timeout_s,
                             replace_after_s=s.worker_replace_s)


@dataclass
class ServerState:
    config: ServerConfig
    supervisor: Supervisor
    metrics: Metrics = field(default_factory=Metrics)
    last_activity: float = field(default_factory=time.monotonic)
    active_requests: int = 0
    _catalog: catalog.Catalog | None = None
    _catalog_at: float = 0.0
    _catalog_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __post_init__(self):
        self.supervisor.on_model_failed = self.model_failed

    async def model_failed(self, key: str, reason: str) -> None:
        """The worker says this model fails: mark it not runnable in the index, so later requests fail fast."""
        try:
            marked = await asyncio.to_thread(catalog.mark_failed, self.config.settings, key, reason)
        except (sqlite3.Error, MlxkError) as error:  # a locked state.db: the worker's error still reached the client
            log.warning("could not mark %s not runnable: %s", key, error)
            return
        if marked:
            log.warning("marked %s not runnable: %s", key, reason)
            async with self._catalog_lock:
                self._catalog = None

    async def get_catalog(self, *, fresh: bool = False) -> catalog.Catalog:
        """The index after a refresh from the cache, done at most once per CATALOG_TTL_S unless `fresh` asks.

        A fresh refresh is kept too, so the routes that follow it (the web page asks /api/models, then /v1/models)
        reuse it instead of refreshing again.
        """
        async with self._catalog_lock:
            if fresh or self._catalog is None or time.monotonic() - self._catalog_at > CATALOG_TTL_S:
                self._catalog = await asyncio.to_thread(catalog.load, self.config.settings)
                self._catalog_at = time.monotonic()
            return self._catalog

    async def model_rows(self) -> list[dict]:
        return (await self.get_catalog()).rows

    async def resolve(self, name: str, types: tuple[str, ...] = catalog.SERVABLE_TYPES) -> catalog.Servable:
        if catalog.is_workspace_id(name):   # state.db and the folder's files, off the event loop
            return await asyncio.to_thread(catalog.resolve_workspace, name, self.config.settings, types)
        return catalog.resolve(name, await self.model_rows(), self.config.settings, types)


def get_state(request: Request) -> ServerState:
    return request.app.state.mlxk


State = Annotated[ServerState, Depends(get_state)]


def request_id(request: Request) -> str:
    return getattr(request.state, "request_id", None) or f"req-{secrets.token_hex(8)}"


RequestId = Annotated[str, Depends(request_id)]


def require_api_key(request: Request, state: State) -> None:
    """With an API key configured, every route but /health needs `Authorization: Bearer <key>` or `X-Api-Key: <key>`
    (what the anthropic SDK and Claude Code send)."""
    expected = state.config.api_key
    if not expected:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    offered = token.strip() if scheme.lower() == "bearer" else request.headers.get("x-api-key", "").strip()
    if not secrets.compare_digest(offered.encode(), expected.encode()):
        raise Unauthorized("missing or wrong API key: send 'Authorization: Bearer <key>' or 'X-Api-Key: <key>'")


Model = TypeVar("Model", bound=BaseModel)


MAX_JSON_DEPTH = 64  # arrays/objects inside each other; OpenAI bodies (tool schemas included) need far fewer


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON value (RFC 8259 has no NaN or Infinity)")


def _path(parent: str, key) -> str:
    return f"{parent}[{key}]" if isinstance(key, int) else (f"{parent}.{key}" if parent else str(key))


def check_json_tree(data) -> None:
    """Refuse what parses as JSON but cannot travel on: nesting deeper than MAX_JSON_DEPTH, and strings that are
    not Unicode text (a lone surrogate such as "\\ud800" cannot be encoded as UTF-8 for the inference worker).

    Iterative, so no body can exhaust the stack. Raises InvalidRequest naming the field.
    """
    stack = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequest(
                    f"'{path or 'body'}' contains a lone UTF-16 surrogate (like \\ud800), which is not text; "
                    "send valid Unicode", param=path or None) from None
        elif isinstance(value, (dict, list)):
            if depth >= MAX_JSON_DEPTH:
                raise InvalidRequest(f"the request body is nested too deeply (more than {MAX_JSON_DEPTH} levels of "
                                     "arrays and objects)", param=path or None)
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    stack.append((key, path, depth))  # a key is checked like a value, reported at its parent
                stack.append((item, _path(path, key), depth + 1))


def load_json(raw: bytes):
    """The parsed body; InvalidRequest (400) for anything that is not JSON the server can carry."""
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:  # the C parser's own guard, long before our depth check could run
        raise InvalidRequest(f"the request body is nested too deeply (more than {MAX_JSON_DEPTH} levels of arrays "
                             "and objects)") from None
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        raise InvalidRequest(f"the request body is not valid JSON: {error}") from None
    check_json_tree(data)
    return data


async def parse_body(request: Request, model: type[Model]) -> Model:
    """The JSON body as `model`; bad JSON and wrong types are 400s in OpenAI's shape, naming the field."""
    data = load_json(await request.body())
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        found = [(field_path(data, e.get("loc", ())), e) for e in error.errors()]
        # the first error's field, or a deeper one inside it (a union tries each member: ["a", 1] fails as a
        # list of strings at input[1], which says more than "input")
        param, first = max((f for f in found if f[0].startswith(found[0][0])), key=lambda f: len(f[0]))
        raise InvalidRequest(f"invalid value for '{param}': {first.get('msg')}", param=param or None) from None


def field_path(data, loc) -> str:
    """A pydantic error location as the request field it names (`input[1]`, `tools[0].function`): the parts that
    walk `data`; a union member's tag (`str`, `list[int]`), which names no field, is left out."""
    path, node = "", data
    for i, part in enumerate(loc):
        if isinstance(part, int) and isinstance(node, list) and 0 <= part < len(node):
            path, node = f"{path}[{part}]", node[part]
        elif isinstance(part, str) and isinstance(node, dict) and (part in node or i == len(loc) - 1):
            path, node = f"{path}.{part}" if path else part, node.get(part)   # the last may be a missing field
    return path


async def parse_optional_body(request: Request, model: type[Model]) -> Model:
    """Like parse_body, but an empty body means the defaults (a JSON-typed POST with no body is a plain cancel)."""
    if not (await request.body()).strip():
        return model()
    return await parse_body(request, model)


def check_supported(body) -> None:
    found = body.unsupported()
    if found is not None:
        param, message = found
        if param not in message:
            message = f"{param}: {message}"
        raise InvalidRequest(message, param=param, code="unsupported_parameter")
