"""A job runs with the settings of the command that queued it — Hub endpoint, cache directory, token — whichever
worker runs it: a real worker process started with one environment, the CLI run with another. The token is kept
at rest only in a 0600 file for the job's life and appears in no view, log or process listing."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import psutil

from tests.fixtures.cli import run, run_json
from tests.fixtures.jobs import MiB, big_files, job_row, repo_path, wait_for
from tests.fixtures.pause import release, wait_paused

TOKEN = "hf_cli_secret_5f3a9c"


def _home() -> Path:
    return Path(os.environ["MLXK_HOME"])


def test_the_cli_token_is_used_kept_private_and_forgotten(hub, worker_manager, monkeypatch):
    hub.add_token(TOKEN, "alice")
    repo = hub.unique_repo("alice/private")
    hub.add_repo(repo, big_files(1 * MiB), private=True)
    worker = worker_manager.start(env={"MLXK_TEST_PAUSE_AT": "pull.progress"})   # started without a token
    monkeypatch.setenv("HF_TOKEN", TOKEN)

    job_id = run("pull", repo).stdout.strip()
    wait_paused(_home(), "pull.progress")
    secret = _home() / "secrets" / job_id
    assert secret.read_text() == TOKEN
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(secret.parent.stat().st_mode) == 0o700
    shown = run("jobs", "show", job_id, "--json").stdout + run("jobs", "show", job_id).stdout
    assert TOKEN not in shown and job_id in shown
    assert TOKEN not in " ".join(psutil.Process(worker.pid).cmdline())

    def finished():
        release(_home(), "pull.progress")
        return job_row(job_id)["state"] in ("succeeded", "failed") and job_row(job_id)

    final = wait_for(finished, timeout=40)
    assert final["state"] == "succeeded", final
    assert all(r.token == TOKEN for r in hub.requests if r.origin == "hub")
    assert not secret.exists()
    assert TOKEN not in worker.output()
    assert TOKEN not in (_home() / "state.db").read_bytes().decode("latin-1")


def test_a_cli_without_a_token_never_borrows_the_workers(hub, worker_manager):
    hub.add_token(TOKEN, "alice")
    repo = hub.unique_repo("alice/not-yours")
    hub.add_repo(repo, big_files(1 * MiB), private=True)
    worker_manager.start(env={"HF_TOKEN": TOKEN})

    result, doc = run_json("pull", repo, "--wait")

    assert result.exit_code == 1, doc
    assert doc["error"]["code"] == "repo_not_found" and "HF_TOKEN" in doc["error"]["message"]
    assert all(r.token is None for r in hub.requests)


def test_the_cli_endpoint_is_used_an_unreachable_hub_fails(hub, worker_manager, monkeypatch):
    repo = hub.unique_repo("org/endpoint")
    hub.add_repo(repo, big_files(1 * MiB))
    worker_manager.start()
    assert run("pull", repo, "--wait").exit_code == 0   # cached now: the worker's own Hub would say up to date

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:1")
    result, doc = run_json("pull", repo, "--wait")

    assert result.exit_code == 1, doc
    assert doc["error"]["code"] == "hub_error" and doc["error"]["type"] == "download_failed"
    assert "cannot reach the Hub at http://127.0.0.1:1" in doc["error"]["message"]
    assert "up to date" not in result.stderr
    # ...but a script can tell that the model is cached and how to use it without the Hub (issue 12)
    cached = repo_path(repo) / "refs" / "main"
    assert doc["data"]["cached"] is True and doc["data"]["hash"] == doc["error"]["hash"] == cached.read_text()
    assert doc["error"]["cached"] is True and "set HF_HUB_OFFLINE=1" in doc["error"]["hint"]
    assert "settings" not in doc["data"]   # pull's document shows no cache paths (mlx-knife's API); jobs show does
    assert run_json("jobs", "show", doc["data"]["id"])[1]["data"]["settings"]["endpoint"] == "http://127.0.0.1:1"


def test_the_cli_cache_is_used(hub, worker_manager, monkeypatch, tmp_path):
    repo = hub.unique_repo("org/other-cache")
    hub.add_repo(repo, big_files(1 * MiB))
    worker_manager.start()
    default = repo_path(repo)   # where the worker's own settings would have put it
    other = tmp_path / "other"
    monkeypatch.setenv("HF_HOME", str(other))
    monkeypatch.delenv("HF_HUB_CACHE")

    result, doc = run_json("pull", repo, "--wait")

    assert result.exit_code == 0, doc
    assert (other / "hub" / ("models--" + repo.replace("/", "--")) / "snapshots").is_dir()
    assert run_json("jobs", "show", doc["data"]["id"])[1]["data"]["settings"]["cache"] == str(other / "hub")
    listed = json.dumps(run_json("list", "--all")[1]["data"])
    assert repo in listed
    assert not default.exists()


def test_a_worker_started_offline_runs_an_online_pull(hub, worker_manager, monkeypatch):
    """QA: a job worker spawned by `HF_HUB_OFFLINE=1 mlxk list` took a pull queued later by a server started
    without it, and failed "HF_HUB_OFFLINE is set". The offline switch is the queuing command's."""
    repo = hub.unique_repo("org/online-pull")
    hub.add_repo(repo, big_files(1 * MiB))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    worker_manager.start(env={"HF_HUB_OFFLINE": "1"})

    result, doc = run_json("pull", repo, "--wait")

    assert result.exit_code == 0, doc
    assert (repo_path(repo) / "refs" / "main").is_file()
    assert run_json("jobs", "show", doc["data"]["id"])[1]["data"]["settings"]["offline"] is False
    assert worker_manager.background_pids() == set()   # the offline worker ran it, no other was started


def test_an_offline_command_s_pull_job_is_refused_by_an_online_worker(hub, worker_manager, monkeypatch):
    """The reverse: a pull job queued under HF_HUB_OFFLINE=1 (a server started offline queues one; the CLI answers
    from the cache instead) never asks the Hub, whichever worker runs it."""
    from mlxk import jobs

    repo = hub.unique_repo("org/offline-pull")
    hub.add_repo(repo, big_files(1 * MiB))
    worker_manager.start()   # without HF_HUB_OFFLINE
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    job_id = jobs.enqueue_pull(repo).job["id"]

    final = wait_for(lambda: job_row(job_id)["state"] in ("succeeded", "failed") and job_row(job_id), timeout=40)
    assert final["state"] == "failed" and "HF_HUB_OFFLINE is set" in json.dumps(final.get("error")), final
    assert not any(repo in r.path for r in hub.requests)
    assert not repo_path(repo).exists()
    assert worker_manager.background_pids() == set()
