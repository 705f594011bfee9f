"""Operations of the api: health, metrics, limits, keep-alive, eviction, `mlxk ps`/`stop`, and no mlx in the api.

One server for the module: max_loaded=1, no API key, a 20 kB body limit and a 64-token prompt limit.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from mlxk.cli import cli
from tests.fixtures.server import RANDOM_ID, SCRIPTED_ID, SCRIPTED_REPLY, spawn_server

HI = [{"role": "user", "content": "hi"}]
BODY_LIMIT = 20_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = spawn_server(tmp_path_factory.mktemp("ops"),
                       models={SCRIPTED_ID: {"reply": SCRIPTED_REPLY}, RANDOM_ID: {}},
                       args=("--max-loaded", "1", "--keep-alive", "60"),
                       env={"MLXK_MAX_BODY_BYTES": BODY_LIMIT, "MLXK_MAX_PROMPT_TOKENS": 64})
    yield srv
    srv.stop()


@pytest.fixture
def use_server(server, monkeypatch):
    """Point this test's mlxk environment (for in-process CLI calls) at the module's server."""
    for name in ("MLXK_HOME", "HF_HOME", "HF_HUB_CACHE", "MLXK_PORT"):
        monkeypatch.setenv(name, server.env[name])
    return server


def chat(server, model=SCRIPTED_ID, **extra) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                      json={"model": model, "messages": HI, "max_tokens": 8, **extra})


def mlxk(*args) -> tuple[int, dict]:
    result = CliRunner().invoke(cli, [*args, "--json"])
    return result.exit_code, json.loads(result.stdout)


def loaded(server) -> list[str]:
    return [m["repo_id"] for m in httpx.get(f"{server.url}/api/ps").json()["models"]]


def test_health_reports_worker_state_without_auth(server):
    body = server.health()
    assert body["status"] == "ok"
    assert body["worker"]["state"] in ("ready", "stopped")


def test_metrics_prometheus_text(server):
    assert chat(server).status_code == 200
    response = httpx.get(f"{server.url}/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    values = dict(re.findall(r"^(mlxk_[a-z_]+(?:\{[^}]*\})?) (\S+)$", text, re.M))
    assert float(values["mlxk_generation_tokens_total"]) >= 3
    assert float(values["mlxk_prompt_tokens_total"]) > 0
    assert float(values["mlxk_time_to_first_token_seconds_count"]) >= 1
    assert float(values['mlxk_time_to_first_token_seconds_bucket{le="+Inf"}']) >= 1
    assert float(values["mlxk_generation_tokens_per_second_count"]) >= 1
    assert values["mlxk_models_loaded"] == "1" and values["mlxk_worker_up"] == "1"
    assert 'mlxk_requests_total{endpoint="chat",status="200"}' in values
    for name in ("mlxk_requests_running", "mlxk_requests_waiting"):
        assert f"# TYPE {name} gauge" in text


def test_body_over_limit_is_413(server):
    big = "x" * (BODY_LIMIT + 1)
    response = httpx.post(f"{server.url}/v1/chat/completions",
                          json={"model": SCRIPTED_ID, "messages": [{"role": "user", "content": big}]})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert "x-request-id" in response.headers

    def chunked():
        yield b'{"model": "x", "messages": [{"role": "user", "content": "'
        for _ in range(5):
            yield b"y" * 5000
        yield b'"}]}'

    response = httpx.post(f"{server.url}/v1/chat/completions", content=chunked(),
                          headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_prompt_over_limit_is_400(server):
    response = chat(server, messages=[{"role": "user", "content": "many words " * 100}])
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["type"] == "invalid_request_error"
    assert error["param"] == "messages" and "maximum context length is" in error["message"]


def test_keep_alive_expiry_shows_in_ps(use_server):
    assert chat(use_server, keep_alive=1).status_code == 200
    code, doc = mlxk("ps")
    assert code == 0 and [m["name"] for m in doc["data"]["models"]] == [SCRIPTED_ID]
    assert doc["data"]["models"][0]["keep_alive_s"] == 1
    deadline = time.monotonic() + 10
    while loaded(use_server) and time.monotonic() < deadline:
        time.sleep(0.2)
    code, doc = mlxk("ps")
    assert code == 0 and doc["data"]["models"] == []


def test_max_loaded_one_evicts(use_server):
    assert chat(use_server, SCRIPTED_ID).status_code == 200
    assert loaded(use_server) == [SCRIPTED_ID]
    assert chat(use_server, RANDOM_ID).status_code == 200
    assert loaded(use_server) == [RANDOM_ID]


def test_stop_unloads(use_server):
    assert chat(use_server, RANDOM_ID).status_code == 200
    code, doc = mlxk("stop", "tiny-scripted")
    assert code == 1 and doc["error"]["type"] == "model_not_found" and "not loaded" in doc["error"]["message"]
    code, doc = mlxk("stop", "tiny-random")
    assert code == 0 and doc["data"]["unloaded"] == [RANDOM_ID]
    assert loaded(use_server) == []
    assert chat(use_server, SCRIPTED_ID).status_code == 200
    code, doc = mlxk("stop", "--all")
    assert code == 0 and doc["data"]["unloaded"] == [SCRIPTED_ID]


def test_stop_with_a_wrong_type_is_400_naming_the_field(server):
    response = httpx.post(f"{server.url}/api/stop", json={"model": 5})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "model" and "'model'" in error["message"]


def test_ps_human_output(use_server):
    assert chat(use_server, SCRIPTED_ID).status_code == 200
    result = CliRunner().invoke(cli, ["ps"])
    assert result.exit_code == 0
    assert "NAME" in result.stdout and SCRIPTED_ID in result.stdout
    assert "requests running: 0, waiting: 0" in result.stdout


def test_ps_without_server(monkeypatch, tmp_path):
    monkeypatch.setenv("MLXK_PORT", "1")
    code, doc = mlxk("ps")
    assert code == 0 and doc["data"]["server"] is None and doc["data"]["models"] == []


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
def test_api_process_never_loads_mlx(server):
    assert chat(server).status_code == 200
    worker_pid = server.health()["worker"]["pid"]
    assert "libmlx" in _maps(worker_pid)   # the probe can see mlx where it is loaded
    assert "libmlx" not in _maps(server.proc.pid) and "mlx/core" not in _maps(server.proc.pid)


def _fresh_python(code: str, tmp_path) -> None:
    """Run code in a new interpreter (so sys.modules shows only what it imported), in a throwaway home."""
    env = {**os.environ, "MLXK_HOME": str(tmp_path / "home"), "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_api_modules_do_not_import_mlx(tmp_path):
    code = (
        "import sys\n"
        "from fastapi.testclient import TestClient\n"
        "from mlxk.server.app import create_app\n"
        "import mlxk.commands.serve, mlxk.client.repl\n"
        "with TestClient(create_app(), base_url='http://127.0.0.1') as c:\n"
        "    assert c.get('/health').status_code == 200\n"
        "    c.get('/v1/models')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm'))\n"
        "assert not bad, bad\n"
    )
    _fresh_python(code, tmp_path)


def test_mlxk_run_resolves_names_without_the_api_process_modules(tmp_path):
    """`mlxk run` resolves a name (mlxk.catalog) before it starts a server: no FastAPI, no MLX on that path."""
    code = (
        "import sys\n"
        "import mlxk.client.repl, mlxk.catalog\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('fastapi', 'starlette', 'mlx', 'mlx_lm'))\n"
        "assert not bad, bad\n"
    )
    _fresh_python(code, tmp_path)


def test_cors_off_by_default_and_on_when_configured(monkeypatch):
    from fastapi.testclient import TestClient

    from mlxk.server.app import create_app

    headers = {"Origin": "http://example.test"}
    with TestClient(create_app(), base_url="http://127.0.0.1") as client:
        assert "access-control-allow-origin" not in client.get("/health", headers=headers).headers
    monkeypatch.setenv("MLXK_CORS_ORIGINS", "http://example.test")
    with TestClient(create_app(), base_url="http://127.0.0.1") as client:
        response = client.get("/health", headers=headers)
        assert response.headers["access-control-allow-origin"] == "http://example.test"
