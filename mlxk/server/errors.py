"""Errors only the server raises; app.py's one handler turns every MlxkError into OpenAI's error shape."""
from __future__ import annotations

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
