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
        """The error `to_dict()` described, as its own class; `message` replaces the text (a caller's prefix).

        Also takes a `--json` envelope's error (`{"type": <mlx-knife's word>, "code": <mlxk's type>, ...}`,
        see cli_error()): its `code` names the class."""
        data = dict(data or {})
        code = data.pop("code", None)
        kind = str(code if isinstance(code, str) and code else data.pop("type", None) or "error")
        data.pop("type", None)
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


class WorkspacePath(InvalidName):
    """A folder path (`./dir`, `/abs/dir`, `~/dir`: mlx-knife's workspace) where only a model name will do: pull,
    rm, clone, serve and the api (a request's `model`) work on the HF cache; `run`, `show` and `health` are the
    commands that read a workspace (`run` registers it: mlxk.catalog.register_workspace)."""
    type = "workspace_path"


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


# ---------------------------------------------------------------------------------------------------------------
# The CLI's --json envelope speaks mlx-knife's error vocabulary (issue 12)
#
# Scripts written for mlx-knife's JSON API match `error.type` against its words (spec 0.2.3 "Error Handling", and
# what mlx-knife 2.0.8 emits: see cli_error()). The envelope's `type` is that word; mlxk's own precise type stays
# beside it as `code` (the word OpenAI's error shape uses for the same thing). Server HTTP error bodies keep their
# dialects' shapes and are not translated here.

KNIFE_TYPES: dict[str, str] = {
    "error": "OperationError",
    "config_error": "ValidationError",
    "usage": "CommandError",              # 2.0.8: argparse errors under --json (exit 2)
    "invalid_name": "ValidationError",
    "workspace_path": "ValidationError",
    "model_not_found": "model_not_found",
    "ambiguous_match": "ambiguous_match",
    "model_not_runnable": "ValidationError",
    "cache_error": "OperationError",      # the spec: "Cache corruption, disk full"
    "state_error": "OperationError",
    "job_not_found": "ValidationError",
    "response_not_found": "ValidationError",
    "job_failed": "OperationError",
    "job_cancelled": "OperationError",
    "conflict": "OperationError",
    "hub_error": "NetworkError",          # the Hub could not be reached or answered with an error
    "repo_not_found": "download_failed",  # the spec's "Download Failed" example: "Repository not found ..."
    "gated_repo": "access_denied",
    "auth_error": "auth_error",
    "revision_not_found": "download_failed",
    "invalid_hub_reply": "download_failed",
    "integrity_error": "download_failed",
    "disk_full": "OperationError",
    "cancelled": "OperationError",
    "server_unavailable": "NetworkError",
    "internal": "InternalError",
    "workspace_invalid": "ValidationError",
    # types the CLI rebuilds from a server's reply (mlxk.client.connection.server_error) that no class here holds:
    # the api's and the inference worker's own
    "invalid_request": "ValidationError",
    "bad_request": "ValidationError",
    "context_length_exceeded": "ValidationError",
    "invalid_api_key": "auth_error",
    "busy": "OperationError",
    "worker_restarting": "OperationError",
    "worker_unresponsive": "OperationError",
    "load_failed": "OperationError",
    "model_failed": "OperationError",
    "server_error": "InternalError",
}

# Where a command says it differently (mlx-knife 2.0.8's operations): `run` reports every failure as
# execution_error (its usage errors stay CommandError; a prompt too long for the model is context_length_exceeded); `pull` has its Hub refusals as access_denied and every
# other Hub failure as download_failed; `rm` a model another job holds as locks_present and a workspace path as
# workspace_model ("Cannot delete workspace model"); `clone` Hub failures as
# clone_failed and an existing target as ValidationError; `push` a missing repo as repo_not_found.
_HUB = ("hub_error", "repo_not_found", "gated_repo", "auth_error", "revision_not_found", "invalid_hub_reply",
        "integrity_error")
KNIFE_COMMAND_TYPES: dict[str, dict[str, str]] = {
    "run": {**{kind: "execution_error" for kind in KNIFE_TYPES if kind != "usage"},
            "context_length_exceeded": "context_length_exceeded"},   # 2.0.8's one typed run error
    "pull": {**{kind: "download_failed" for kind in _HUB},
             "repo_not_found": "access_denied", "gated_repo": "access_denied", "auth_error": "access_denied"},
    "rm": {"conflict": "locks_present", "workspace_path": "workspace_model"},
    "clone": {**{kind: "clone_failed" for kind in _HUB}, "conflict": "ValidationError"},
    "push": {"repo_not_found": "repo_not_found"},
}


def knife_type(kind: str, command: str | None = None) -> str:
    """mlx-knife's word for mlxk's error type `kind` in `command`'s --json envelope; a type from another process
    that this one does not know maps as a plain error (OperationError, or run's execution_error)."""
    table = KNIFE_COMMAND_TYPES.get(command or "", {})
    if kind in table:
        return table[kind]
    if kind not in KNIFE_TYPES:
        return table.get("error", KNIFE_TYPES["error"])
    return KNIFE_TYPES[kind]


def cli_error(error: MlxkError, command: str | None = None) -> dict:
    """The `error` of a --json envelope: `{"type": mlx-knife's word, "code": mlxk's type, "message", ...details}`.
    MlxkError.from_dict() reads it back (by `code`)."""
    body = error.to_dict()
    return {"type": knife_type(error.type, command), "code": body.pop("type"), **body}
