"""Logs: one redacting formatter for every process, text or JSON lines, with request and job ids.

Reproduction (issue 9): only `serve` had --log-level, there was no JSON format, and nothing redacted tokens or home
paths. The end-to-end test runs a real `mlxk serve --log-level debug --log-json` whose inference worker and
background job worker (started by it) inherit the settings, feeds secrets through every door a request has, and
reads every log file they wrote.
"""
from __future__ import annotations

import io
import json
import os
import logging
import time

import httpx
import pytest

from mlxk import logs
from tests.fixtures.queue import reap_background_workers
from tests.fixtures.server import SCRIPTED_ID, SCRIPTED_REPLY, spawn_server

HF_TOKEN = "hf_AbCdEfGhIjKlMnOpQrStUv123456"
API_KEY = "key-Zq81-very-secret"


@pytest.mark.parametrize("text, expected", [
    (f"token {HF_TOKEN} used", "token [REDACTED] used"),
    ("Authorization: Bearer abc.def-ghi", "Authorization: [REDACTED]"),
    ("{'authorization': 'Basic dXNlcjpwYXNz', 'x': 1}", "{'authorization': '[REDACTED]', 'x': 1}"),
    ("(b'authorization', b'Bearer abc123')", "(b'authorization', b'[REDACTED]')"),
    ('"headers": {"Authorization": "Bearer abc"}', '"headers": {"Authorization": "[REDACTED]"}'),
    ("sent bearer abc123 to x", "sent bearer [REDACTED] to x"),
    (f"key={API_KEY}!", "key=[REDACTED]!"),
    ("/home/ann/.cache/huggingface/hub and /home/ann", "~/.cache/huggingface/hub and ~"),
    ("/home/anna/x stays", "/home/anna/x stays"),   # another user's home is not ours
    ("nothing to hide", "nothing to hide"),
])
def test_redactor(text, expected):
    assert logs.Redactor([API_KEY], home="/home/ann")(text) == expected


def test_json_lines_carry_ids_and_tracebacks_are_redacted(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    for name in ("MLXK_LOG_LEVEL", "MLXK_LOG_JSON"):  # setup exports them for children: undo that after the test
        monkeypatch.setenv(name, "")
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()
    logs.setup("debug", True, secrets=[API_KEY], stream=stream)
    try:
        log = logging.getLogger("mlxk.test")
        token = logs.request_id.set("req-1")
        with logs.job_context("job-9"):
            log.debug("auth %s", {"Authorization": f"Bearer {API_KEY}"})
            try:
                raise RuntimeError(f"failed with {HF_TOKEN}")
            except RuntimeError:
                log.exception("boom")
        logs.request_id.reset(token)
        log.info("outside")
    finally:
        root.handlers[:], root.level = saved
    assert os.environ["MLXK_LOG_JSON"] == "1" and os.environ["MLXK_LOG_LEVEL"] == "debug"  # for child processes
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["level"] for line in lines] == ["debug", "error", "info"]
    assert lines[0]["request_id"] == "req-1" and lines[0]["job_id"] == "job-9" and "request_id" not in lines[2]
    assert "RuntimeError" in lines[1]["exc"]
    assert HF_TOKEN not in stream.getvalue() and API_KEY not in stream.getvalue()


def test_a_bad_log_level_is_a_clear_error(monkeypatch):
    from mlxk.config import settings
    from mlxk.errors import ConfigError

    monkeypatch.setenv("MLXK_LOG_LEVEL", "loud")
    with pytest.raises(ConfigError, match="MLXK_LOG_LEVEL='loud' is not a log level; use one of debug, info"):
        settings()


def test_no_secret_and_no_home_in_any_log_of_a_real_server(tmp_path):
    user_home = tmp_path / "user"
    srv = spawn_server(tmp_path, models={SCRIPTED_ID: {"reply": SCRIPTED_REPLY}}, api_key=API_KEY,
                       args=("--log-level", "debug", "--log-json"),
                       env={"HF_TOKEN": HF_TOKEN, "MLXK_HOME": str(user_home / "mlxk"), "MLXK_WORKER_IDLE": "3",
                            "HF_ENDPOINT": "http://127.0.0.1:9"})
    try:
        with srv.http() as http:
            rid = http.post("/v1/chat/completions", json={"model": SCRIPTED_ID, "max_tokens": 2,
                                                          "messages": [{"role": "user", "content": "hi"}]},
                            headers={"x-request-id": "req-chat-1"}).headers["x-request-id"]
            assert http.get(f"/api/jobs/{HF_TOKEN}").status_code == 404          # a token in the path
            httpx.get(f"{srv.url}/api/jobs", headers={"Authorization": f"Bearer {HF_TOKEN}"}, timeout=10)
            job = http.post("/api/jobs/pull", json={"model": "org/private-model"}).json()
            deadline = time.monotonic() + 60
            while http.get(f"/api/jobs/{job['id']}").json()["state"] not in ("failed", "succeeded", "cancelled"):
                assert time.monotonic() < deadline, "the pull job did not end"
                time.sleep(0.2)
    finally:
        srv.stop()
        reap_background_workers(user_home / "mlxk")
    worker_log = user_home / "mlxk" / "logs" / "worker.log"
    texts = {"server": srv.log(), "worker": worker_log.read_text(errors="replace")}
    for name, text in texts.items():
        assert text.strip(), name
        for secret in (HF_TOKEN, API_KEY, str(user_home)):
            assert secret not in text, (name, secret)
        lines = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line is JSON
        assert any(line["level"] == "debug" for line in lines), name
    server_lines = [json.loads(line) for line in texts["server"].splitlines()]
    access = [line for line in server_lines if line["logger"] == "uvicorn.access"]
    assert any(line.get("request_id") == rid == "req-chat-1" and "/v1/chat/completions" in line["msg"]
               for line in access)
    assert any("[REDACTED]" in line["msg"] for line in access)                    # the token in the path
    assert any(line["logger"].startswith("mlxk.inference") for line in server_lines)  # the child logs JSON too
    assert any("~/mlxk" in line["msg"] for line in server_lines)                  # home paths shown as ~
    worker_lines = [json.loads(line) for line in texts["worker"].splitlines()]
    assert any(line.get("job_id") == job["id"] for line in worker_lines)


def test_mlxk_worker_takes_the_log_options(tmp_path):
    """`mlxk worker --log-level debug --log-json` (foreground; --background so it exits when idle)."""
    import subprocess
    import sys

    env = {**os.environ, "MLXK_WORKER_IDLE": "1", "HF_TOKEN": HF_TOKEN}
    result = subprocess.run([sys.executable, "-c", "from mlxk.cli import main; main()", "worker", "--background",
                             "--no-scan", "--log-level", "debug", "--log-json"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    assert any(line["level"] == "debug" for line in lines)
    assert any("started" in line["msg"] for line in lines if line["logger"] == "mlxk.consumer")
    assert HF_TOKEN not in result.stderr and str(tmp_path / "user") not in result.stderr
