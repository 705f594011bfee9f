"""Errors of the inference worker; each becomes one `error` event of the protocol (see protocol.py)."""
from __future__ import annotations

from mlxk.errors import MlxkError

from . import protocol


class InferenceError(MlxkError):
    """`param` names the request field at fault when the worker knows it (it rides in the event)."""
    type = protocol.ERR_INTERNAL
    http_status = 500
    retryable = False

    def __init__(self, message: str, *, param: str | None = None, status: int | None = None):
        super().__init__(message)
        self.param = param
        if status is not None:
            self.http_status = status

    def to_event(self) -> dict:
        event = protocol.error_event(self.type, self.message, self.http_status, self.retryable)
        if self.param:
            event["param"] = self.param
        return event


class BadRequest(InferenceError):
    type = protocol.ERR_BAD_REQUEST
    http_status = 400


class PromptTooLong(InferenceError):
    """OpenAI's context_length_exceeded: clients (litellm, ...) match the code and "maximum context length is N".
    `prompt_tokens` (in the event when known) is the prompt's count, which a count-only request still answers."""
    type = protocol.ERR_CONTEXT_LENGTH_EXCEEDED
    http_status = 400

    def __init__(self, message: str, *, prompt_tokens: int | None = None, param: str | None = None):
        super().__init__(message, param=param)
        self.prompt_tokens = prompt_tokens

    def to_event(self) -> dict:
        event = super().to_event()
        if self.prompt_tokens is not None:
            event["prompt_tokens"] = self.prompt_tokens
        return event


class LoadFailed(InferenceError):
    """The request names no loadable model folder (no directory, no config.json): the caller's mistake."""
    type = protocol.ERR_LOAD_FAILED
    http_status = 400


class ModelFailed(InferenceError):
    """The model itself failed while loading or generating (a broken conversion: wrong dtypes, shapes that do not
    match its config). Only its own requests fail; the worker unloads it and keeps serving every other model.
    422: the request was fine, the model it names cannot process it; retrying will not help."""
    type = protocol.ERR_MODEL_FAILED
    http_status = 422

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key.split('@', 1)[0]} {reason}")
        self.key, self.reason = key, reason

    def to_event(self) -> dict:
        return {**super().to_event(), "model": self.key, "reason": self.reason}


class WorkerBusy(InferenceError):
    """The waiting queue is full, or the worker is shutting down: try again (elsewhere or later)."""
    type = protocol.ERR_BUSY
    http_status = 503
    retryable = True


class Internal(InferenceError):
    type = protocol.ERR_INTERNAL
    http_status = 500


def one_line(e: BaseException) -> str:
    """An exception as one line for an error message: its type and the first line of its text."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def out_of_memory(e: BaseException) -> bool:
    """MLX reports a failed allocation as MemoryError (std::bad_alloc) or "[metal::malloc] Unable to allocate"."""
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and "allocate" in str(e).lower())
