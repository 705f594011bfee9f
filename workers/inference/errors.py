"""Errors of the inference worker; each becomes one `error` event of the protocol (see protocol.py)."""
from __future__ import annotations

from mlxk.errors import MlxkError

from . import protocol


class InferenceError(MlxkError):
    type = protocol.ERR_INTERNAL
    http_status = 500
    retryable = False

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.http_status = status

    def to_event(self) -> dict:
        return protocol.error_event(self.type, self.message, self.http_status, self.retryable)


class BadRequest(InferenceError):
    type = protocol.ERR_BAD_REQUEST
    http_status = 400


class PromptTooLong(InferenceError):
    """OpenAI's context_length_exceeded: clients (litellm, ...) match the code and "maximum context length is N"."""
    type = protocol.ERR_CONTEXT_LENGTH_EXCEEDED
    http_status = 400


class LoadFailed(InferenceError):
    type = protocol.ERR_LOAD_FAILED
    http_status = 500


class WorkerBusy(InferenceError):
    """The waiting queue is full, or the worker is shutting down: try again (elsewhere or later)."""
    type = protocol.ERR_BUSY
    http_status = 503
    retryable = True


class Internal(InferenceError):
    type = protocol.ERR_INTERNAL
    http_status = 500
