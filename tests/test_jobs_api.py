"""The jobs API over real HTTP: a real `mlxk serve` subprocess, the job worker it starts on its own, and the test Hub.

The server is started with HF_ENDPOINT pointing at the test Hub; the job worker the api starts in the background
inherits the api's environment, so a pull queued over HTTP downloads from the test Hub into the server's cache.
"""
from __future__ import annotations

import time

import httpx
import pytest

from tests import factory
from tests.fixtures.jobs import MiB, hub_env
from tests.fixtures.queue import reap_background_workers
from tests.fixtures.server import API_KEY, SCRIPTED_ID, SCRIPTED_REPLY, spawn_server


@pytest.fixture(scope="module")
def server(tmp_path_factory, hub_server):
    root = tmp_path_factory.mktemp("jobs-api")
    srv = spawn_server(root, models={SCRIPTED_ID: {"reply": SCRIPTED_REPLY}}, api_key=API_KEY,
                       env=hub_env(hub_server))
    yield srv
    srv.stop()
    reap_background_workers(root / "mlxk")


@pytest.fixture
def client(server, hub):
    with server.http(timeout=30) as http:
        yield http


def wait_job(client, job_id: str, states=("succeeded", "failed", "cancelled"), timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    job = None
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not reach {states} in {timeout}s: {job}")


def slow_files(size: int = 3 * MiB) -> dict[str, bytes]:
    blob = (b"mlxk-jobs-api" * (size // 13 + 1))[:size]
    return {"config.json": b'{"model_type": "llama"}', "model.safetensors": blob, "tokenizer.json": b"{}"}


def error_of(response: httpx.Response) -> dict:
    return response.json()["error"]


def test_pull_reaches_succeeded_and_the_model_is_listed_and_runnable(client, hub):
    repo = hub.unique_repo("mlx-community/api-pulled")
    hub.add_repo(repo, factory.tiny_model_files(reply=SCRIPTED_REPLY))
    assert repo not in [m["name"] for m in client.get("/api/models").json()["models"]]

    response = client.post("/api/jobs/pull", json={"model": repo})

    assert response.status_code == 202, response.text
    job = response.json()
    assert job["kind"] == "pull" and job["target"] == repo and job["existing"] is False
    assert job["state"] in ("queued", "running") and len(job["id"]) == 12
    assert job["id"] in [j["id"] for j in client.get("/api/jobs").json()["jobs"]]
    done = wait_job(client, job["id"][:6])   # a unique prefix names the job
    assert done["state"] == "succeeded", done
    assert done["progress"]["bytes_done"] == done["progress"]["bytes_total"] > 0
    assert len(done["result"]["revision"]) == 40

    models = {m["name"]: m for m in client.get("/api/models").json()["models"]}
    assert models[repo]["health"] == "healthy" and models[repo]["framework"] == "MLX"
    assert models[repo]["hash"] == done["result"]["revision"] and models[repo]["size_bytes"] > 0
    assert SCRIPTED_ID in models    # the model the server started with is there too
    assert repo in [m["id"] for m in client.get("/v1/models").json()["data"]]
    reply = client.post("/v1/chat/completions", json={"model": repo, "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == SCRIPTED_REPLY


def test_models_are_the_list_json_data(client):
    body = client.get("/api/models").json()
    assert set(body) == {"models", "count", "system", "pending", "size_bytes"} and body["count"] == len(body["models"])
    assert all(isinstance(m["runtime_compatible"], bool) for m in body["models"])
    assert body["size_bytes"] == sum(m["disk_bytes"] or 0 for m in body["models"]) > 0   # the page's "on disk"
    scripted = next(m for m in body["models"] if m["name"] == SCRIPTED_ID)
    for field in ("name", "hash", "size_bytes", "last_modified", "framework", "model_type", "capabilities",
                  "health", "runtime_compatible", "reason", "cached"):
        assert field in scripted
    assert scripted["model_type"] == "chat" and scripted["cached"] is True


def test_duplicate_pull_cancel_and_retry(client, hub):
    repo = hub.unique_repo("org/api-slow")
    hub.add_repo(repo, slow_files())
    hub.faults.rate_limit_bps = 1 * MiB    # ~3 s of download: time to see it running, join it and cancel it

    first = client.post("/api/jobs/pull", json={"model": repo})
    second = client.post("/api/jobs/pull", json={"model": repo})

    assert first.status_code == 202 and second.status_code == 200, (first.text, second.text)
    job_id = first.json()["id"]
    assert second.json()["id"] == job_id and second.json()["existing"] is True
    wait_job(client, job_id, states=("running",))
    cancelled = client.post(f"/api/jobs/{job_id}/cancel", json={"purge": False})
    assert cancelled.status_code == 200, cancelled.text
    assert wait_job(client, job_id)["state"] == "cancelled"
    again = client.post(f"/api/jobs/{job_id}/cancel", json={})
    assert again.status_code == 409 and error_of(again)["code"] == "conflict"

    hub.faults.rate_limit_bps = None
    retried = client.post(f"/api/jobs/{job_id}/retry", json={})

    assert retried.status_code == 202, retried.text
    new = retried.json()
    assert new["id"] != job_id and new["retry_of"] == job_id and new["target"] == repo
    assert wait_job(client, new["id"])["state"] == "succeeded"
    twice = client.post(f"/api/jobs/{new['id']}/retry", json={})
    assert twice.status_code == 409 and "only failed or cancelled jobs" in error_of(twice)["message"]
    history = [j["id"] for j in client.get("/api/jobs", params={"all": "1"}).json()["jobs"]]
    assert job_id in history and new["id"] in history


@pytest.mark.parametrize("body, code", [
    ({"model": "../etc"}, "workspace_path"),   # a folder path, not a name (names.not_a_name)
    ({"model": "na..me"}, "invalid_name"),   # a bare name is mlx-community/NAME, still validated
    ({"model": "org/na..me"}, "invalid_name"),
    ({"model": "a/b/c"}, "invalid_name"),
    ({}, "invalid_request"),
    ({"model": "org/name", "include": "*.json"}, "invalid_request"),
])
def test_bad_pull_requests_are_400_and_queue_nothing(client, body, code):
    before = len(client.get("/api/jobs", params={"all": "1"}).json()["jobs"])

    response = client.post("/api/jobs/pull", json=body)

    assert response.status_code == 400, response.text
    assert error_of(response)["code"] == code and error_of(response)["type"] == "invalid_request_error"
    assert response.headers["x-request-id"]
    assert len(client.get("/api/jobs", params={"all": "1"}).json()["jobs"]) == before


@pytest.mark.parametrize("method, path", [
    ("GET", "/api/jobs/0123456789ab"),
    ("POST", "/api/jobs/0123456789ab/cancel"),
    ("POST", "/api/jobs/0123456789ab/retry"),
])
def test_unknown_job_is_404(client, method, path):
    response = client.request(method, path, json={} if method == "POST" else None)
    assert response.status_code == 404, response.text
    assert error_of(response)["code"] == "job_not_found" and "no job matches" in error_of(response)["message"]


def test_scan_is_queued_as_a_job(client):
    response = client.post("/api/jobs/scan", json={"repos": [SCRIPTED_ID]})
    assert response.status_code in (200, 202), response.text
    job = response.json()
    assert job["kind"] == "scan"
    assert wait_job(client, job["id"])["state"] == "succeeded"


@pytest.mark.parametrize("method, path, body", [
    ("GET", "/api/models", None),
    ("GET", "/api/jobs", None),
    ("GET", "/api/jobs/0123456789ab", None),
    ("POST", "/api/jobs/pull", {"model": "org/name"}),
    ("POST", "/api/jobs/0123456789ab/cancel", {}),
    ("POST", "/api/jobs/0123456789ab/retry", {}),
    ("POST", "/api/jobs/scan", {}),
    ("POST", "/api/jobs/rm", {"model": SCRIPTED_ID}),
])
def test_api_key_is_required(server, method, path, body):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.request(method, server.url + path, json=body, headers=headers, timeout=10)
        assert response.status_code == 401, (path, response.text)
        assert error_of(response)["code"] == "invalid_api_key"


def test_page_and_assets_need_no_key_and_nothing_else_is_served(server):
    page = httpx.get(server.url + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src" not in page.headers["content-security-policy"]   # default-src 'self' covers scripts
    assert "/ui/app.js" in page.text and "http" not in page.text.replace("http-equiv", "")  # no CDN
    for name, media in (("app.js", "text/javascript"), ("style.css", "text/css")):
        asset = httpx.get(f"{server.url}/ui/{name}", timeout=10)
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(media)
    for path in ("/ui/missing.js", "/ui/..%2Froutes%2Fui.py", "/ui/.hidden.js"):
        assert httpx.get(server.url + path, timeout=10).status_code == 404, path


def test_the_event_loop_stays_free_while_a_cancel_waits(client, server, hub):
    """jobs.cancel waits up to ~3 s for a running task to stop; /health must answer meanwhile."""
    import threading

    repo = hub.unique_repo("org/api-loop")
    hub.add_repo(repo, slow_files(4 * MiB))
    hub.faults.rate_limit_bps = 1 * MiB
    job_id = client.post("/api/jobs/pull", json={"model": repo}).json()["id"]
    wait_job(client, job_id, states=("running",))
    results = {}

    def cancel():
        started = time.monotonic()
        results["cancel"] = client.post(f"/api/jobs/{job_id}/cancel", json={})
        results["cancel_s"] = time.monotonic() - started

    thread = threading.Thread(target=cancel)
    thread.start()
    time.sleep(0.05)
    health_s = []
    while not health_s or thread.is_alive():
        started = time.monotonic()
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200
        health_s.append(time.monotonic() - started)
        time.sleep(0.05)
    thread.join()
    assert results["cancel"].status_code == 200
    assert max(health_s) < 0.5, (health_s, results["cancel_s"])


# ---------------------------------------------------------------- rm (the web page's Remove)


def cached_names(client) -> list[str]:
    return [m["name"] for m in client.get("/api/models").json()["models"]]


def test_rm_is_the_cli_rm_job_with_its_refusals(client, server):
    repo = "org/api-doomed"
    repo_dir = server.root / "hf" / "hub" / "models--org--api-doomed"
    factory.write_repo(server.root / "hf" / "hub", repo, factory.tiny_model_files())
    assert repo in cached_names(client)

    fuzzy = client.post("/api/jobs/rm", json={"model": "api-doom"})   # as `mlxk rm api-doom`: not without force
    assert fuzzy.status_code == 409 and error_of(fuzzy)["code"] == "conflict", fuzzy.text
    assert "matches org/api-doomed" in error_of(fuzzy)["message"] and repo_dir.exists()

    response = client.post("/api/jobs/rm", json={"model": repo})

    assert response.status_code == 200, response.text
    job = response.json()
    assert (job["kind"], job["target"], job["state"]) == ("rm", repo, "succeeded")
    assert not repo_dir.exists() and repo not in cached_names(client)
    assert job["id"] in [j["id"] for j in client.get("/api/jobs", params={"all": "1"}).json()["jobs"]]
    again = client.post("/api/jobs/rm", json={"model": repo})
    assert again.status_code == 404 and error_of(again)["code"] == "model_not_found", again.text


@pytest.mark.parametrize("body, status, code", [
    ({"model": "org/na..me"}, 400, "invalid_name"),
    ({"model": "org/never-cached"}, 404, "model_not_found"),
    ({}, 400, "invalid_request"),
    ({"model": SCRIPTED_ID, "purge": True}, 400, "invalid_request"),
    ({"model": SCRIPTED_ID, "force": "yes please"}, 400, "invalid_request"),
])
def test_bad_rm_requests_remove_nothing(client, body, status, code):
    response = client.post("/api/jobs/rm", json=body)
    assert response.status_code == status and error_of(response)["code"] == code, response.text
    assert SCRIPTED_ID in cached_names(client)


def test_rm_from_a_browser_needs_a_json_body(client):
    response = client.post("/api/jobs/rm", content=f'{{"model": "{SCRIPTED_ID}"}}',
                           headers={"content-type": "text/plain", "origin": "http://evil.example",
                                    "sec-fetch-site": "cross-site"})
    assert response.status_code == 415, response.text
    assert SCRIPTED_ID in cached_names(client)


def test_rm_of_a_model_a_pull_is_using_is_refused(client, server, hub):
    repo = hub.unique_repo("org/api-busy")
    hub.add_repo(repo, slow_files())
    factory.write_repo(server.root / "hf" / "hub", repo, factory.tiny_model_files())   # an older copy is cached
    hub.faults.rate_limit_bps = 1 * MiB
    job_id = client.post("/api/jobs/pull", json={"model": repo}).json()["id"]
    wait_job(client, job_id, states=("running",))

    response = client.post("/api/jobs/rm", json={"model": repo})

    assert response.status_code == 409 and error_of(response)["code"] == "conflict", response.text
    assert f"in use by job {job_id}" in error_of(response)["message"]
    client.post(f"/api/jobs/{job_id}/cancel", json={})
    assert wait_job(client, job_id)["state"] == "cancelled"
    assert repo in cached_names(client)
