"""Every entry point that takes a model name validates it the same way (mlxk.names) before any disk, queue or network
work: the CLI's pull, rm, clone, push, show, health and health --scan, and the jobs API's pull and scan."""
from __future__ import annotations

import pytest

from tests.fixtures.cli import run_json
from tests.fixtures.jobs import state_db
from tests.fixtures.queue import reap_background_workers
from tests.fixtures.server import API_KEY, spawn_server

HOSTILE_NAMES = ["../../etc", "org/../../etc", "org/na..me", "a/b/c", "org/name\0x", "/etc/passwd"]


def _no_jobs() -> bool:
    from mlxk.db import jobs as jobs_db

    try:
        with state_db() as conn:
            return jobs_db.list_jobs(conn) == []
    except Exception:   # noqa: BLE001 — no state.db at all is "no jobs" too
        return True


def _commands(name: str, tmp_path) -> list[list[str]]:
    workspace = tmp_path / "ws"
    workspace.mkdir(exist_ok=True)
    (workspace / "config.json").write_text("{}")
    return [["pull", name], ["rm", name, "--force"], ["clone", name, str(tmp_path / "dest")],
            ["push", str(workspace), name, "--private"], ["show", name], ["health", name],
            ["health", "--scan", name]]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_every_cli_entry_point_refuses_a_bad_name_before_any_work(name, tmp_path, reap_workers):
    from mlxk.names import is_workspace_path

    for argv in _commands(name, tmp_path):
        result, doc = run_json(*argv)
        assert result.exit_code == 1, (argv, result.output)
        if argv in (["show", name], ["health", name]) and is_workspace_path(name):
            # a workspace path (mlx-knife's API): read-only, outside the cache, and this one is no model folder
            assert doc["error"]["code"] == "model_not_found" and "is not a" in doc["error"]["message"]
            continue
        # a path where a model name is needed: invalid_name's workspace_path, which names the commands that read one
        # (push's destination is a Hub repo id, checked as one)
        path = is_workspace_path(name) and argv[0] != "push"
        assert doc["error"]["code"] == ("workspace_path" if path else "invalid_name"), (argv, doc)
        assert repr(name) in doc["error"]["message"] or repr(name.partition("@")[0]) in doc["error"]["message"], \
            (argv, doc)
    assert _no_jobs()
    assert not (tmp_path / "dest").exists()


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    root = tmp_path_factory.mktemp("names-api")
    server = spawn_server(root, api_key=API_KEY)
    yield server
    server.stop()
    reap_background_workers(root / "mlxk")


@pytest.mark.parametrize("route, body", [
    ("/api/jobs/scan", {"repos": ["../../etc"]}),
    ("/api/jobs/scan", {"repos": ["org/good", "org/../../etc"]}),
    ("/api/jobs/scan", {"repos": ["a/b/c"]}),
    ("/api/jobs/pull", {"model": "../../etc"}),
])
def test_the_jobs_api_refuses_a_bad_name_with_400_naming_it(api, route, body):
    bad = body.get("model") or body["repos"][-1]
    with api.http(timeout=30) as http:
        before = http.get("/api/jobs", params={"all": "1"}).json()["jobs"]
        response = http.post(route, json=body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        from mlxk.names import is_workspace_path

        expected = "workspace_path" if route.endswith("/pull") and is_workspace_path(bad) else "invalid_name"
        assert error["code"] == expected and repr(bad) in error["message"], error
        assert http.get("/api/jobs", params={"all": "1"}).json()["jobs"] == before


def test_a_good_scan_request_is_still_queued(api):
    with api.http(timeout=30) as http:
        response = http.post("/api/jobs/scan", json={"repos": ["org/good", "gpt2"]})
        assert response.status_code in (200, 202), response.text
        assert response.json()["kind"] == "scan"
