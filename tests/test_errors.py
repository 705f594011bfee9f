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
