"""The error family across process boundaries: one closed set of `type` strings, and one way back from the JSON a
worker stored (MlxkError.from_dict) to the class, its HTTP status and its details."""
from __future__ import annotations

import pytest

from mlxk import errors

# The contract: scripts match these strings. Adding one is a decision (update this list); renaming one breaks users.
TYPES = {
    "error", "config_error", "usage", "invalid_name", "invalid_hub_reply", "model_not_found", "ambiguous_match", "model_not_runnable",
    "cache_error", "state_error", "job_not_found", "job_failed", "job_cancelled", "conflict", "hub_error",
    "repo_not_found", "gated_repo", "auth_error", "revision_not_found", "integrity_error", "disk_full", "cancelled",
    "server_unavailable", "internal", "workspace_invalid", "response_not_found",
    "workspace_path",
}


def test_the_set_of_type_strings_is_closed_and_pinned():
    assert set(errors.TYPES) == TYPES
    assert "internal_error" not in errors.TYPES   # one spelling: `internal`


@pytest.mark.parametrize("kind", sorted(TYPES))
def test_every_type_round_trips_to_its_class(kind):
    cls = errors.TYPES[kind]
    original = cls("something failed; do this instead.", job_id="abc", path="/x")

    rebuilt = errors.MlxkError.from_dict(original.to_dict())

    assert type(rebuilt) is cls and rebuilt.type == kind
    assert rebuilt.to_dict() == original.to_dict() and rebuilt.http_status == original.http_status


def test_an_unknown_type_keeps_its_string_and_a_message_can_be_replaced():
    rebuilt = errors.MlxkError.from_dict({"type": "from_the_future", "message": "m", "n": 1}, message="job x: m")
    assert type(rebuilt) is errors.MlxkError
    assert rebuilt.to_dict() == {"type": "from_the_future", "message": "job x: m", "n": 1}
    assert errors.MlxkError.from_dict(None).to_dict() == {"type": "error", "message": "unknown error"}


def test_a_job_that_crashed_is_reported_as_internal():
    from mlxk.workers.signals import error_record

    assert error_record(ZeroDivisionError("boom")) == {"type": "internal", "message": "ZeroDivisionError: boom"}


# mlx-knife's words (spec 0.2.3 "Error Handling" and what mlx-knife 2.0.8's operations emit): the only values the
# CLI's --json `error.type` may take
KNIFE_WORDS = {"ValidationError", "ambiguous_match", "model_not_found", "download_failed", "NetworkError",
               "PermissionError", "OperationError", "InternalError", "locks_present", "auth_error", "clone_failed",
               "execution_error", "access_denied", "CommandError", "repo_not_found", "workspace_model",
               "context_length_exceeded"}


@pytest.mark.parametrize("kind", sorted(set(TYPES) | set(errors.KNIFE_TYPES)))
def test_every_type_has_mlx_knifes_word_in_every_command(kind):
    """A new type cannot be forgotten: each one maps, in every command, onto mlx-knife's vocabulary."""
    assert kind in errors.KNIFE_TYPES
    for command in (None, "list", "show", "health", "rm", "pull", "run", "version", "clone", "push", "jobs show"):
        assert errors.knife_type(kind, command) in KNIFE_WORDS, (kind, command)


@pytest.mark.parametrize("kind, command, word", [
    ("invalid_name", "pull", "ValidationError"), ("ambiguous_match", "show", "ambiguous_match"),
    ("model_not_found", "rm", "model_not_found"), ("repo_not_found", "pull", "access_denied"),
    ("hub_error", "pull", "download_failed"), ("hub_error", "list", "NetworkError"),
    ("conflict", "rm", "locks_present"), ("workspace_path", "rm", "workspace_model"),
    ("model_not_found", "run", "execution_error"), ("usage", "run", "CommandError"),
    ("internal", "show", "InternalError"), ("context_length_exceeded", "run", "context_length_exceeded"),
    ("busy", "run", "execution_error"), ("invalid_api_key", "ps", "auth_error"),
    ("repo_not_found", "clone", "clone_failed"), ("auth_error", "push", "auth_error"),
    ("from_the_future", "show", "OperationError"), ("from_the_future", "run", "execution_error"),
])
def test_mlx_knife_words_as_2_0_8_emits_them(kind, command, word):
    assert errors.knife_type(kind, command) == word


def test_an_envelope_error_keeps_mlxks_type_as_code_and_reads_back():
    original = errors.ModelNotFound("no cached model matches 'x'.", name="x", suggestions=[])
    body = errors.cli_error(original, "run")
    assert body == {"type": "execution_error", "code": "model_not_found", "message": "no cached model matches 'x'.",
                    "name": "x", "suggestions": []}
    rebuilt = errors.MlxkError.from_dict(body)
    assert type(rebuilt) is errors.ModelNotFound and rebuilt.to_dict() == original.to_dict()


@pytest.mark.parametrize("status, body, cls", [
    (404, {"error": {"message": "no cached model matches 'x'.", "type": "invalid_request_error",
                     "code": "model_not_found", "param": "model"}}, errors.ModelNotFound),              # OpenAI
    (400, {"type": "error", "error": {"type": "invalid_request_error", "message": "bad", "code": "workspace_path"}},
     errors.WorkspacePath),                                                                           # Anthropic
    (404, {"error": "model 'x' not found"}, errors.ModelNotFound),                                     # Ollama
])
def test_a_server_error_rebuilt_by_the_cli_keeps_its_class_and_enters_the_envelope_by_the_table(status, body, cls):
    """Server bodies keep their dialects' shapes (mlxk's type as `code`); the CLI rebuilds the class
    (connection.server_error → MlxkError.from_dict) and its --json envelope then speaks mlx-knife's words."""
    from mlxk.client.connection import server_error

    rebuilt = server_error(status, body, "fallback")
    assert type(rebuilt) is cls and rebuilt.http_status == status
    envelope_error = errors.cli_error(rebuilt, "run")
    assert (envelope_error["type"], envelope_error["code"]) == ("execution_error", cls.type)
    assert type(errors.MlxkError.from_dict(envelope_error)) is cls


# The documented contract of every error type: the CLI's exit code (README: 0 success, 1 error, 2 usage) and the HTTP
# status the api answers with. A change to any of these is a change users see, so it is pinned here, one row a type.
STATUS = {
    "ambiguous_match": (1, 400), "auth_error": (1, 401), "cache_error": (1, 400), "cancelled": (1, 400),
    "config_error": (1, 400), "conflict": (1, 409), "disk_full": (1, 400), "error": (1, 400), "gated_repo": (1, 403),
    "hub_error": (1, 400), "integrity_error": (1, 400), "internal": (1, 500), "invalid_hub_reply": (1, 400),
    "invalid_name": (1, 400), "job_cancelled": (1, 400), "job_failed": (1, 400), "job_not_found": (1, 404),
    "model_not_found": (1, 404), "model_not_runnable": (1, 400), "repo_not_found": (1, 404),
    "response_not_found": (1, 404), "revision_not_found": (1, 404), "server_unavailable": (1, 503),
    "state_error": (1, 400), "usage": (2, 400), "workspace_invalid": (1, 400), "workspace_path": (1, 400),
}


def test_every_type_has_its_documented_exit_code_and_http_status():
    assert {kind: (cls.exit_code, cls.http_status) for kind, cls in errors.TYPES.items()} == STATUS


def test_only_classes_of_this_module_register_a_type():
    class Elsewhere(errors.MlxkError):   # defined in the tests' module: never a wire type of mlxk
        type = "elsewhere_error"

    class SortsFirst(errors.MlxkError):  # a module name that sorts before mlxk.errors, and one after it
        __module__ = "aaa"
        type = "sorts_first_error"

    assert "elsewhere_error" not in errors.TYPES and "sorts_first_error" not in errors.TYPES
    assert errors.TYPES["invalid_name"] is errors.InvalidName


def test_an_empty_or_non_string_code_falls_back_to_the_type():
    for code in ("", None, 7):
        error = errors.MlxkError.from_dict({"type": "model_not_found", "code": code, "message": "m"})
        assert type(error) is errors.ModelNotFound and error.message == "m"


def test_runs_usage_errors_keep_their_word_and_everything_else_is_execution_error():
    assert errors.knife_type("usage", "run") == "CommandError"
    assert errors.knife_type("model_not_found", "run") == "execution_error"
