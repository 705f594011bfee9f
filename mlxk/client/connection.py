"""The CLI's side of the server: find it, start one in the background, and call it over HTTP (httpx).

`mlxk run` must work with nothing started: when no server answers, it starts `mlxk serve` detached (its own
session, logs in MLXK_HOME/logs/server.log, exits by itself after server_idle_s without a request). A file lock
keeps two `mlxk run` started at once from starting two servers.
"""
from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from typing import Iterator

import httpx

from mlxk import processes
from mlxk.config import Settings, child_env
from mlxk.locks import file_lock
from mlxk.errors import MlxkError, ServerUnavailable
from mlxk.output import say

START_TIMEOUT_S = 60.0
HEALTH_TIMEOUT_S = 2.0


# What a reply without mlxk's own error body means (Ollama's routes answer `{"error": "..."}`, a proxy plain text)
STATUS_TYPES = {401: "invalid_api_key", 404: "model_not_found", 503: "busy"}


def server_error(status: int, body, fallback: str) -> MlxkError:
    """The error a server reply carries, rebuilt through MlxkError.from_dict, so the CLI raises the same class and
    `type` the server raised (mlxk.errors' one closed set). OpenAI's and Anthropic's shapes carry mlxk's type as
    the error's `code`; a body without one (Ollama's, or not JSON) gets its type from the HTTP status."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        data = {k: v for k, v in error.items() if k not in ("type", "code") and v is not None}
        kind = error.get("code") or error.get("type")
    else:
        data = {"message": error} if isinstance(error, str) and error else {}
        kind = None
    data["message"] = data.get("message") or fallback
    rebuilt = MlxkError.from_dict({**data, "type": kind or STATUS_TYPES.get(status, "server_error")})
    rebuilt.http_status = status
    return rebuilt


@dataclass(frozen=True)
class Endpoint:
    url: str
    api_key: str | None = None

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=HEALTH_TIMEOUT_S).status_code == 200
    except httpx.HTTPError:
        return False


def find_server(settings: Settings) -> Endpoint | None:
    """The server this MLXK_HOME started (pid file), else whatever answers at the configured address."""
    record = processes.read_server_pid_file(settings)
    urls = [record["url"]] if record and record.get("url") else []
    urls.append(settings.server_url)
    for url in dict.fromkeys(urls):
        if _healthy(url):
            return Endpoint(url, settings.api_key)
    return None


def start_background(settings: Settings) -> Endpoint:
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    log_path = settings.log_dir / "server.log"
    argv = processes.python_argv("-c", "from mlxk.cli import main; main()", "serve",
                                 "--idle-exit", str(max(1.0, settings.server_idle_s)))
    say(f"Starting a server in the background (logs: {log_path}) ...")
    with open(log_path, "ab") as out:   # isolated from the user's directory: see mlxk.processes
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=processes.SAFE_CWD, env=child_env("mlxk run"))
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise ServerUnavailable(f"the background server exited with code {proc.returncode}: "
                                    + " | ".join(tail))
        if _healthy(settings.server_url):
            return Endpoint(settings.server_url, settings.api_key)
        time.sleep(0.1)
    raise ServerUnavailable(f"the background server did not answer within {START_TIMEOUT_S:.0f}s; see {log_path}")


def ensure_server(settings: Settings) -> Endpoint:
    found = find_server(settings)
    if found:
        return found
    with file_lock(settings.run_dir / "server.start.lock"):
        return find_server(settings) or start_background(settings)


class Client:
    def __init__(self, endpoint: Endpoint, timeout: float | None = None):
        self.endpoint = endpoint
        self.http = httpx.Client(base_url=endpoint.url, headers=endpoint.headers,
                                 timeout=httpx.Timeout(timeout, connect=10.0))

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _check(self, response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        response.read()
        try:
            body = response.json()
        except ValueError:
            body = None
        error = server_error(response.status_code, body, f"HTTP {response.status_code}: {response.text[:200]}")
        if response.status_code == 401:
            # The server's text speaks to HTTP clients (send a header); a CLI user sets the key in the environment.
            error.message = (
                f"the server at {self.endpoint.url} needs an API key"
                f"{' and refused the one in MLXK_API_KEY' if self.endpoint.api_key else ''}: "
                "set MLXK_API_KEY to the key it was started with (`export MLXK_API_KEY=...`) and run the command "
                "again.")
        raise error

    def get(self, path: str) -> dict:
        response = self.http.get(path)
        self._check(response)
        return response.json()

    def post(self, path: str, body: dict) -> dict:
        response = self.http.post(path, json=body)
        self._check(response)
        return response.json()

    def chat_stream(self, body: dict) -> Iterator[dict]:
        """Chunks of a streamed chat completion; an error chunk raises its error (server_error)."""
        with self.http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
            self._check(response)
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise server_error(500, chunk, "the server ended the stream with an error")
                yield chunk
