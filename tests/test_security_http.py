"""Browser-borne requests are refused, and the API key stays out of the process list.

Reproductions (issue 9): a plain HTML form (`enctype="text/plain"`) on any site could start a pull and cancel the
user's download on the keyless localhost server; any Host was answered (DNS rebinding); `mlxk serve --api-key KEY`
left KEY in `ps`. The main cases run against a real `mlxk serve` process over real HTTP; configuration variants
(allowed origins and hosts, a wildcard bind) use the same app in-process through Starlette's TestClient.
"""
from __future__ import annotations

import subprocess
import sys
import time

import httpx
import psutil
import pytest
from fastapi.testclient import TestClient

from tests.fixtures.queue import reap_background_workers
from tests.fixtures.server import SCRIPTED_ID, SCRIPTED_REPLY, free_port, server_env, spawn_server

EVIL = "http://evil.example"
BROWSER_CROSS_SITE = {"Origin": EVIL, "Sec-Fetch-Site": "cross-site"}   # what a browser adds to a page's write


@pytest.fixture(scope="module")
def keyless(tmp_path_factory):
    """The default server: localhost, no API key (what a browser on the same machine can reach)."""
    root = tmp_path_factory.mktemp("keyless")
    srv = spawn_server(root, env={"MLXK_WORKER_IDLE": "2"})
    yield srv
    srv.stop()
    reap_background_workers(root / "mlxk")


def jobs_of(srv) -> list[dict]:
    return httpx.get(f"{srv.url}/api/jobs", params={"all": "1"}, timeout=10).json()["jobs"]


def error_of(response) -> dict:
    return response.json()["error"]


# ---------------------------------------------------------------- a form on another site


@pytest.mark.parametrize("content_type", [
    "text/plain",                           # <form enctype="text/plain">: '{"model": "org/name", "x": "="}'
    "application/x-www-form-urlencoded",    # the default form encoding
    "multipart/form-data; boundary=x",
    None,                                   # fetch(..., {mode: "no-cors"}) with a bare body
])
def test_a_form_post_is_415_and_queues_nothing(keyless, content_type):
    headers = {**BROWSER_CROSS_SITE, **({"content-type": content_type} if content_type else {})}
    before = jobs_of(keyless)

    response = httpx.post(f"{keyless.url}/api/jobs/pull", content=b'{"model": "org/name"}', headers=headers,
                          timeout=10)

    assert response.status_code == 415, response.text
    assert error_of(response)["code"] == "unsupported_media_type"
    assert "Content-Type: application/json" in error_of(response)["message"]
    assert response.headers["x-request-id"]
    assert jobs_of(keyless) == before


@pytest.mark.parametrize("method, path", [
    ("POST", "/api/jobs/scan"), ("POST", "/api/jobs/0123456789ab/cancel"), ("POST", "/api/jobs/0123456789ab/retry"),
    ("POST", "/api/stop"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
])
def test_every_state_changing_route_needs_json(keyless, method, path):
    response = httpx.request(method, keyless.url + path, content=b"{}",
                             headers={"content-type": "text/plain", **BROWSER_CROSS_SITE}, timeout=10)
    assert response.status_code == 415, (path, response.text)


@pytest.mark.parametrize("fetch_headers", [{"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                                           {"Origin": EVIL}, {"Origin": "null"}])
def test_either_browser_header_alone_still_needs_json(keyless, fetch_headers):
    before = jobs_of(keyless)
    response = httpx.post(f"{keyless.url}/api/jobs/pull", content=b'{"model": "org/name"}',
                          headers={"content-type": "text/plain", **fetch_headers}, timeout=10)
    assert response.status_code == 415, response.text
    assert jobs_of(keyless) == before


@pytest.mark.parametrize("fetch_headers", [{}, {"Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"}])
def test_a_non_browser_client_body_is_json_whatever_its_content_type(keyless, fetch_headers):
    """`curl URL -d '{...}'` (Ollama's own examples) sends application/x-www-form-urlencoded and no Origin."""
    response = httpx.post(f"{keyless.url}/api/show", content=b'{"model": "no-such-model-here"}',
                          headers={"content-type": "application/x-www-form-urlencoded", **fetch_headers}, timeout=10)
    assert response.status_code == 404, response.text   # parsed and answered, not 415
    bare = httpx.post(f"{keyless.url}/api/show", content=b'{"model": "no-such-model-here"}', timeout=10)
    assert bare.status_code == 404, bare.text


def test_a_bodyless_delete_needs_no_content_type(keyless):
    """`curl -X DELETE /v1/responses/ID`: no body, no content type."""
    response = httpx.delete(f"{keyless.url}/v1/responses/resp_0123456789abcdef", timeout=10)
    assert response.status_code == 404, response.text
    browser = httpx.delete(f"{keyless.url}/v1/responses/resp_0123456789abcdef", headers={"Origin": EVIL},
                           timeout=10)
    assert browser.status_code == 403, browser.text   # a page on another site is still refused


def test_another_origin_cannot_queue_or_cancel(keyless):
    same_site = {"Origin": keyless.url}

    started = httpx.post(f"{keyless.url}/api/jobs/pull", json={"model": "org/name"}, headers=same_site, timeout=10)
    assert started.status_code in (200, 202), started.text   # the page's own origin (our web UI) is allowed
    job_id = started.json()["id"]

    for origin in (EVIL, "null", keyless.url.replace("127.0.0.1", "localhost"), keyless.url + "0"):
        pull = httpx.post(f"{keyless.url}/api/jobs/pull", json={"model": "org/other"}, headers={"Origin": origin},
                          timeout=10)
        cancel = httpx.post(f"{keyless.url}/api/jobs/{job_id}/cancel", json={}, headers={"Origin": origin},
                            timeout=10)
        for response in (pull, cancel):
            assert response.status_code == 403, (origin, response.text)
            assert error_of(response)["code"] == "cross_site_request"
            assert "MLXK_CORS_ORIGINS" in error_of(response)["message"]
    pulls = [job for job in jobs_of(keyless) if job["kind"] == "pull"]
    assert [job["target"] for job in pulls] == ["org/name"] and pulls[0]["state"] != "cancelled"


@pytest.mark.parametrize("host, status", [
    ("evil.example", 421), ("evil.example:{port}", 421), ("127.0.0.1.evil.example:{port}", 421),
    ("localhost:{port}", 200), ("127.0.0.1:{port}", 200), ("[::1]:{port}", 200), ("LOCALHOST", 200),
])
def test_host_must_be_loopback_against_dns_rebinding(keyless, host, status):
    response = httpx.get(f"{keyless.url}/api/jobs", headers={"Host": host.format(port=keyless.port)}, timeout=10)
    assert response.status_code == status, response.text
    if status == 421:
        assert error_of(response)["code"] == "host_not_allowed"
        assert "MLXK_ALLOWED_HOSTS" in error_of(response)["message"]


def test_the_web_page_still_loads_and_its_script_sends_json(keyless):
    page = httpx.get(f"{keyless.url}/", headers={"Host": f"localhost:{keyless.port}"}, timeout=10)
    script = httpx.get(f"{keyless.url}/ui/app.js", timeout=10)
    assert page.status_code == 200 and script.status_code == 200
    # every POST the page makes goes through api() with a body, or the chat fetch: both set the JSON type
    assert script.text.count('"Content-Type": "application/json"') == 2
    assert 'method: "POST", body: {}' in script.text


def test_405_names_the_allowed_methods(keyless):
    response = httpx.get(f"{keyless.url}/v1/chat/completions", timeout=10)
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert "use POST" in error_of(response)["message"]


# ---------------------------------------------------------------- configured variants (in-process app)


def _client(monkeypatch, *, host="127.0.0.1", api_key=None, env=None, base_url="http://127.0.0.1:8000"):
    from mlxk.server.app import create_app
    from mlxk.server.deps import ServerConfig

    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    return TestClient(create_app(ServerConfig.from_settings(host=host, api_key=api_key)), base_url=base_url)


def test_allowed_origins_may_post(monkeypatch):
    with _client(monkeypatch, env={"MLXK_CORS_ORIGINS": "http://app.example"}) as client:
        allowed = client.post("/api/jobs/0123456789ab/cancel", json={}, headers={"Origin": "http://app.example"})
        refused = client.post("/api/jobs/0123456789ab/cancel", json={}, headers={"Origin": EVIL})
    assert allowed.status_code == 404 and error_of(allowed)["code"] == "job_not_found"   # past the guard
    assert refused.status_code == 403


def test_allowed_hosts_extend_the_loopback_names(monkeypatch):
    with _client(monkeypatch, env={"MLXK_ALLOWED_HOSTS": "mybox.lan"}, base_url="http://mybox.lan:8000") as c:
        assert c.get("/api/jobs").status_code == 200
        assert c.get("/api/jobs", headers={"Host": "other.lan"}).status_code == 421


def test_a_key_and_a_wildcard_bind_answer_any_host(monkeypatch):
    auth = {"Authorization": "Bearer k3y-k3y"}
    with _client(monkeypatch, host="0.0.0.0", api_key="k3y-k3y", base_url="http://mybox.lan:8000") as client:
        assert client.get("/api/jobs", headers=auth).status_code == 200
        assert client.get("/api/jobs").status_code == 401
    with _client(monkeypatch, host="127.0.0.1", api_key="k3y-k3y", base_url="http://mybox.lan:8000") as client:
        assert client.get("/api/jobs", headers=auth).status_code == 421   # a loopback bind: still loopback names
    with _client(monkeypatch, host="10.1.2.3", api_key="k3y-k3y", base_url="http://10.1.2.3:8000") as client:
        assert client.get("/api/jobs", headers=auth).status_code == 200   # the bound address itself


# ---------------------------------------------------------------- the key and `ps`


def cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode(errors="replace")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/cmdline")
def test_api_key_flag_is_wiped_from_the_process_list_and_never_reaches_the_worker(tmp_path):
    key = "sekrit-key-4242"
    srv = spawn_server(tmp_path, models={SCRIPTED_ID: {"reply": SCRIPTED_REPLY}}, api_key=key)
    try:
        assert key not in cmdline(srv.proc.pid)
        assert " serve" in cmdline(srv.proc.pid)   # the same process (exec keeps the pid), started again without the key
        reply = srv.openai().chat.completions.create(model=SCRIPTED_ID, max_tokens=2,
                                                     messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content
        children = psutil.Process(srv.proc.pid).children(recursive=True)
        assert children, "the inference worker should be running"
        for child in children:
            assert key not in cmdline(child.pid), child
            with open(f"/proc/{child.pid}/environ", "rb") as f:
                assert key.encode() not in f.read(), child   # nor its environment
    finally:
        srv.stop()


def test_api_key_file_and_env(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("from-a-file-123\n")
    by_file = spawn_server(tmp_path / "file", args=("--api-key-file", str(key_file)))
    by_env = spawn_server(tmp_path / "env", env={"MLXK_API_KEY": "from-the-env-123"})
    try:
        for srv, key in ((by_file, "from-a-file-123"), (by_env, "from-the-env-123")):
            assert httpx.get(f"{srv.url}/api/jobs", timeout=10).status_code == 401
            ok = httpx.get(f"{srv.url}/api/jobs", headers={"Authorization": f"Bearer {key}"}, timeout=10)
            assert ok.status_code == 200
            assert key not in cmdline(srv.proc.pid)
    finally:
        by_file.stop()
        by_env.stop()


@pytest.mark.parametrize("content, message", [(None, "cannot read the API key file"), ("\n", "is empty")])
def test_a_bad_key_file_is_a_clear_error(tmp_path, content, message):
    key_file = tmp_path / "key"
    if content is not None:
        key_file.write_text(content)
    port = free_port()
    result = subprocess.run([sys.executable, "-c", "from mlxk.cli import main; main()", "serve", "--port", str(port),
                             "--api-key-file", str(key_file)], env=server_env(tmp_path, port), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr


def test_flag_and_file_together_is_a_usage_error(tmp_path):
    from click.testing import CliRunner

    from mlxk.cli import cli

    key_file = tmp_path / "key"
    key_file.write_text("abcd1234")
    started = time.monotonic()
    result = CliRunner().invoke(cli, ["serve", "--api-key", "x1234", "--api-key-file", str(key_file)])
    assert result.exit_code == 2 and "not both" in result.output
    assert time.monotonic() - started < 30
