"""Errors only the server raises; app.py's one handler turns every MlxkError into OpenAI's error shape."""
from __future__ import annotations

import re

from mlxk.errors import MlxkError


class InvalidRequest(MlxkError):
    """A request the OpenAI API would refuse: bad JSON, a wrong type, an unsupported field (named in `param`)."""
    type = "invalid_request"
    http_status = 400

    def __init__(self, message: str, *, param: str | None = None, **details):
        super().__init__(message, param=param, **details)
        self.param = param


class Unauthorized(MlxkError):
    type = "invalid_api_key"
    http_status = 401


class CrossSiteRefused(MlxkError):
    """A state-changing request sent by a web page on another origin."""
    type = "cross_site_request"
    http_status = 403


class MisdirectedHost(MlxkError):
    """A Host header that names neither this server nor a loopback address (DNS rebinding)."""
    type = "host_not_allowed"
    http_status = 421


class UnsupportedMediaType(MlxkError):
    type = "unsupported_media_type"
    http_status = 415


class BodyTooLarge(MlxkError):
    type = "request_too_large"
    http_status = 413


class InternalError(MlxkError):
    """A bug: an exception no handler expected. Logged with its traceback; the client gets this, never the trace."""
    type = "internal"
    http_status = 500


class WorkerRestarting(MlxkError):
    """The inference worker died or is (re)starting; the request may simply be retried."""
    type = "worker_restarting"
    http_status = 503
    retryable = True


class WorkerUnresponsive(WorkerRestarting):
    """The inference worker is alive but has not answered a ping for MLXK_WORKER_TIMEOUT seconds."""
    type = "worker_unresponsive"


class WorkerError(MlxkError):
    """An `error` event of the inference worker, carried with its own type and status."""
    http_status = 500

    def __init__(self, event: dict):
        super().__init__(event.get("message") or "the inference worker failed")
        self.type = event.get("type") or "internal"
        self.http_status = int(event.get("status") or 500)
        self.retryable = bool(event.get("retryable"))
        self.details = {"retryable": self.retryable}
        self.prompt_tokens = event.get("prompt_tokens")  # a prompt over the context: its count (count_tokens)
        if event.get("param"):
            self.details["param"] = event["param"]


def openai_error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 404:
        return "not_found_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def openai_error_body(error: MlxkError) -> dict:
    """OpenAI's error shape; `code` is mlxk's stable type string, extra details ride along."""
    details = dict(error.details)
    code = details.pop("code", None) or error.type
    param = details.pop("param", None)
    body = {"message": error.message, "type": openai_error_type(error.http_status), "param": param, "code": code}
    body.update({k: v for k, v in details.items() if k not in body})
    if getattr(error, "retryable", False):
        body["retryable"] = True
    return {"error": body}


ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                         404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                         503: "overloaded_error", 529: "overloaded_error"}


def anthropic_error_type(status: int) -> str:
    """Anthropic's error `type` for a status (its errors doc; other 4xx are invalid requests, other 5xx api errors)."""
    return ANTHROPIC_ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")


def _anthropic_message(error: MlxkError) -> str:
    """The message; a prompt over the context says so in Anthropic's words first ("prompt is too long: N tokens > M
    maximum"), which Claude Code reads as its cue to compact the conversation."""
    if error.type == "context_length_exceeded":
        limit = re.search(r"maximum context length is (\d+) tokens", error.message)
        used = re.search(r"resulted in (\d+) tokens", error.message)
        if limit and used:
            return f"prompt is too long: {used[1]} tokens > {limit[1]} maximum. {error.message}"
    return error.message


def anthropic_error_body(error: MlxkError, request_id: str = "") -> dict:
    """Anthropic's error shape; mlxk's stable type string rides along as `error.code`."""
    inner = {"type": anthropic_error_type(error.http_status), "message": _anthropic_message(error), "code": error.type}
    body = {"type": "error", "error": inner}
    if request_id:
        body["request_id"] = request_id
    return body


ANTHROPIC_PATH = "/v1/messages"  # Anthropic's Messages API and everything under it


# Ollama's routes (routes/ollama.py); /api/ps is Ollama's superset of mlxk's own list, so it answers in Ollama's shape
OLLAMA_PATHS = frozenset({"/api/version", "/api/tags", "/api/show", "/api/ps", "/api/chat", "/api/generate",
                          "/api/embed", "/api/embeddings", "/api/pull", "/api/delete", "/api/copy"})


def ollama_error_body(error: MlxkError) -> dict:
    """Ollama's error shape: one string."""
    return {"error": error.message}


def error_body(path: str, error: MlxkError, request_id: str = "") -> dict:
    """The error shape of the dialect a path belongs to: Anthropic's under /v1/messages, Ollama's on its routes, else
    OpenAI's (which the Responses API shares). The one choice, for the app's handler and the middleware alike."""
    if path == ANTHROPIC_PATH or path.startswith(ANTHROPIC_PATH + "/"):
        return anthropic_error_body(error, request_id)
    if path.rstrip("/") in OLLAMA_PATHS:
        return ollama_error_body(error)
    return openai_error_body(error)
