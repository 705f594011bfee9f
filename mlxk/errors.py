"""The error family of mlxk.

The domain raises these; the CLI (mlxk.output) and the server each turn them into their wire shape in one place.
`type` is a stable string scripts can match on; the message names the problem and, where there is one, the fix.

An error that crosses a process boundary (job worker → state.db → CLI) travels as `to_dict()` and is rebuilt by
`MlxkError.from_dict()`, the one place that maps a `type` string back to its class — as huey rebuilds a remote
failure in one place. Every class below registers its `type` (TYPES, pinned by tests/test_errors.py); an unknown
type from an older or newer process is rebuilt as a plain MlxkError that keeps the string.
"""
from __future__ import annotations

TYPES: dict[str, type["MlxkError"]] = {}


class MlxkError(Exception):
    type = "error"
    exit_code = 1
    http_status = 400

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "type" in cls.__dict__ and cls.__module__ == __name__:
            TYPES.setdefault(cls.type, cls)

    def __init__(self, message: str, **details):
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict:
        """`{"type", "message", **details}`: JSON-ready (what state.db, `--json` and the jobs API carry)."""
        return {"type": self.type, "message": self.message, **self.details}

    @classmethod
    def from_dict(cls, data: dict | None, *, message: str | None = None) -> "MlxkError":
        """The error `to_dict()` described, as its own class; `message` replaces the text (a caller's prefix)."""
        data = dict(data or {})
        kind = str(data.pop("type", None) or "error")
        text = message if message is not None else str(data.pop("message", None) or "unknown error")
        data.pop("message", None)
        error = TYPES.get(kind, MlxkError).__new__(TYPES.get(kind, MlxkError))
        MlxkError.__init__(error, text, **data)
        if kind not in TYPES:
            error.type = kind   # keep a type this process does not know, so scripts still match it
        return error


TYPES[MlxkError.type] = MlxkError


class ConfigError(MlxkError):
    type = "config_error"


class UsageError(MlxkError):
    """The command line itself is wrong (an unknown command or option, a missing argument, a value out of range):
    exit code 2, as click's own usage errors."""
    type = "usage"
    exit_code = 2


class InvalidName(MlxkError):
    type = "invalid_name"


class ModelNotFound(MlxkError):
    type = "model_not_found"
    http_status = 404


class AmbiguousMatch(MlxkError):
    type = "ambiguous_match"


class ModelNotRunnable(MlxkError):
    type = "model_not_runnable"


class CacheError(MlxkError):
    type = "cache_error"


class StateError(MlxkError):
    """state.db or queue.db cannot be used."""
    type = "state_error"


class JobNotFound(MlxkError):
    type = "job_not_found"
    http_status = 404


class ResponseNotFound(MlxkError):
    """A stored OpenAI Responses object that is not there (never stored, deleted, or pruned after its keep time)."""
    type = "response_not_found"
    http_status = 404


class JobFailed(MlxkError):
    type = "job_failed"


class JobCancelled(MlxkError):
    type = "job_cancelled"


class Conflict(MlxkError):
    """Another job holds the model, or the operation would overwrite something it should not."""
    type = "conflict"
    http_status = 409


class HubError(MlxkError):
    type = "hub_error"


class RepoNotFound(HubError):
    type = "repo_not_found"
    http_status = 404


class GatedRepo(HubError):
    type = "gated_repo"
    http_status = 403


class AuthError(HubError):
    type = "auth_error"
    http_status = 401


class RevisionNotFound(HubError):
    type = "revision_not_found"
    http_status = 404


class InvalidHubReply(HubError):
    """The Hub's answer breaks rules every client relies on (a file path leaving the repo, a malformed oid or size):
    it is untrusted input, so the pull stops before writing anything."""
    type = "invalid_hub_reply"


class IntegrityError(HubError):
    """Downloaded bytes do not match the hash the Hub published."""
    type = "integrity_error"


class DiskFull(MlxkError):
    type = "disk_full"


class Cancelled(MlxkError):
    type = "cancelled"


class ServerUnavailable(MlxkError):
    type = "server_unavailable"
    http_status = 503


class Internal(MlxkError):
    """An unexpected exception (a bug), carried across processes as `internal` with its class name."""
    type = "internal"
    http_status = 500


class WorkspaceInvalid(MlxkError):
    """A workspace that would push broken files (`mlxk push --check-only` findings)."""
    type = "workspace_invalid"
