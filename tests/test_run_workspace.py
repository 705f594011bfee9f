"""`mlxk run ./dir` runs a workspace folder (mlx-knife's workspace paths, issue 12), safely: the CLI registers the
folder in state.db and names it to the server by an opaque id (`workspace:<16 hex>`); the api resolves only
registered ids and refuses a folder path in a request's `model`. Real `mlxk serve`, inference worker and MLX on a
tiny scripted model written into a temp folder."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import factory
from tests.fixtures.cli import MLXK
from tests.fixtures.mlx_knife import REFERENCE, validate
from tests.fixtures.server import SCRIPTED_ID, SCRIPTED_REPLY, spawn_server

WORKSPACE_ID = r"^workspace:[0-9a-f]{16}$"


@pytest.fixture(scope="module")
def knife_server(tmp_path_factory):
    """No API key (the CLI finds it through MLXK_HOME), one cached model next to the workspaces."""
    srv = spawn_server(tmp_path_factory.mktemp("ws-run"), models={SCRIPTED_ID: {"reply": SCRIPTED_REPLY}})
    yield srv
    srv.stop()


def make_workspace(folder: Path) -> Path:
    """A flat model folder (what `mlxk clone` or mlx_lm.convert leaves): the scripted tiny model's files."""
    folder.mkdir(parents=True)
    for name, data in factory.tiny_model_files(reply=SCRIPTED_REPLY).items():
        (folder / name).write_bytes(data)
    return folder


def listing(folder: Path) -> list[tuple]:
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in folder.rglob("*"))


def mlxk(server, *args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, dict | None]:
    done = subprocess.run([*MLXK, *args], env=server.env, cwd=cwd, capture_output=True, text=True, timeout=180)
    try:
        return done, json.loads(done.stdout)
    except json.JSONDecodeError:
        return done, None


def test_run_a_workspace_folder_end_to_end(knife_server, tmp_path):
    import re

    workspace = make_workspace(tmp_path / "my-model")
    before = listing(workspace)
    done, doc = mlxk(knife_server, "run", "./my-model", "say", "hi", "--json", cwd=tmp_path)
    assert done.returncode == 0, (done.stdout, done.stderr)
    data = doc["data"]
    # mlx-knife 2.0.8's run document: `model` is what was typed
    assert (doc["status"], doc["command"], data["model"], data["prompt"]) == ("success", "run", "./my-model", "say hi")
    assert data["response"] == SCRIPTED_REPLY and data["finish_reason"] == "stop"
    assert re.match(WORKSPACE_ID, data["workspace_id"])
    if (REFERENCE / "json-api-schema.json").is_file():   # mlx-knife's schema, outside the repository
        validate(doc)

    # the same folder by another spelling is the same registration; the api serves it by that id
    again, doc2 = mlxk(knife_server, "run", str(workspace), "hi", "--json", cwd=tmp_path)
    assert again.returncode == 0 and doc2["data"]["workspace_id"] == data["workspace_id"], again.stderr
    with knife_server.http() as http:
        reply = http.post("/v1/chat/completions", json={"model": data["workspace_id"],
                                                        "messages": [{"role": "user", "content": "hi"}]})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == SCRIPTED_REPLY
        ollama = http.post("/api/chat", json={"model": data["workspace_id"], "stream": False,
                                              "messages": [{"role": "user", "content": "hi"}]})
        assert ollama.status_code == 200 and ollama.json()["message"]["content"] == SCRIPTED_REPLY, ollama.text
        ps = http.get("/api/ps").json()
        assert any(m["name"].startswith(data["workspace_id"]) or m["model"].startswith(data["workspace_id"])
                   for m in ps["models"]), ps

    text, _ = mlxk(knife_server, "run", "./my-model", "hi", cwd=tmp_path)   # the streamed form, as a person runs it
    assert (text.returncode, text.stdout) == (0, SCRIPTED_REPLY + "\n"), text.stderr

    assert listing(workspace) == before   # nothing written into the user's folder
    listed = json.loads(mlxk(knife_server, "list", "--json", cwd=tmp_path)[0].stdout)
    assert [m["name"] for m in listed["data"]["models"]] == [SCRIPTED_ID]   # workspaces are not listed (mlx-knife)


def test_the_api_refuses_a_folder_path_and_an_unregistered_id(knife_server, tmp_path):
    workspace = make_workspace(tmp_path / "private")
    with knife_server.http() as http:
        for model in (str(workspace), "./private", "~/private"):
            reply = http.post("/v1/chat/completions", json={"model": model,
                                                            "messages": [{"role": "user", "content": "hi"}]})
            assert reply.status_code == 400, reply.text
            error = reply.json()["error"]
            assert error["code"] == "workspace_path" and error["param"] == "model", error
            assert "the api never reads a folder named in a request" in error["message"]
            assert "registers it and gives its id" in error["message"]
        reply = http.post("/v1/chat/completions", json={"model": "workspace:0123456789abcdef",
                                                        "messages": [{"role": "user", "content": "hi"}]})
        assert reply.status_code == 404 and "register a model folder with `mlxk run PATH`" in reply.text, reply.text


def test_a_registered_workspace_whose_folder_is_gone_is_a_clear_error(knife_server, tmp_path):
    workspace = make_workspace(tmp_path / "gone")
    done, doc = mlxk(knife_server, "run", "./gone", "hi", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    workspace_id = doc["data"]["workspace_id"]
    shutil.rmtree(workspace)
    with knife_server.http() as http:
        reply = http.post("/v1/chat/completions", json={"model": workspace_id,
                                                        "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 404, reply.text
    message = reply.json()["error"]["message"]
    assert f"workspace {workspace_id} ({workspace}) no longer holds a model" in message and "mlxk run PATH" in message

    done, doc = mlxk(knife_server, "run", "./gone", "hi", "--json", cwd=tmp_path)
    assert done.returncode == 1 and (doc["error"]["type"], doc["error"]["code"]) == ("execution_error",
                                                                                     "model_not_found"), done.stdout
    assert "'./gone' is not a folder" in doc["error"]["message"] and "Traceback" not in done.stderr


@pytest.mark.parametrize("make, expected", [
    (lambda d: d.mkdir(), "has no config.json"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text('{"model_type": "llama"}')), "No model weights found"),
])
def test_run_of_a_folder_that_holds_no_runnable_model_registers_nothing(knife_server, tmp_path, make, expected):
    import sqlite3

    make(tmp_path / "nomodel")
    done, doc = mlxk(knife_server, "run", "./nomodel", "hi", "--json", cwd=tmp_path)
    assert done.returncode == 1 and doc["error"]["type"] == "execution_error", done.stdout
    assert expected in doc["error"]["message"] and "Traceback" not in done.stderr
    with sqlite3.connect(Path(knife_server.env["MLXK_HOME"]) / "state.db") as conn:
        paths = [row[0] for row in conn.execute("SELECT path FROM workspaces")]
    conn.close()
    assert str((tmp_path / "nomodel").resolve()) not in paths


def test_a_workspace_keeps_its_id_and_a_changed_folder_is_loaded_afresh(tmp_path):
    """In process (conftest's isolated MLXK_HOME): one id per absolute path; the servable's revision is the folder's
    stamp, so the inference worker (keyed by repo@revision) loads a changed folder again."""
    import os

    from mlxk.config import settings
    from mlxk import catalog

    workspace = make_workspace(tmp_path / "ws")
    config = settings()
    workspace_id = catalog.register_workspace(str(workspace), config)
    assert catalog.register_workspace(str(tmp_path / "ws" / ".." / "ws"), config) == workspace_id
    first = catalog.resolve(workspace_id, [], config)
    assert (first.repo_id, first.path, first.row["display_name"]) == (workspace_id, str(workspace), str(workspace))
    readme = workspace / "README.md"
    os.utime(readme, ns=(readme.stat().st_atime_ns, readme.stat().st_mtime_ns + 10**9))
    second = catalog.resolve(workspace_id, [], config)
    assert second.repo_id == first.repo_id and second.key != first.key
    other = catalog.register_workspace(str(make_workspace(tmp_path / "other")), config)
    assert other != workspace_id
