"""Household limits on pulls: `--max-rate` / MLXK_MAX_RATE caps a pull's bandwidth and MLXK_MAX_PULLS caps the pulls
running at once; both ride on the job and show in `jobs show`. Real CLI, real worker process, the test Hub."""
from __future__ import annotations

import time

import pytest

from tests.fixtures.cli import run, run_json
from tests.fixtures.jobs import MiB, big_files, job_row, wait_for


def test_max_rate_flag_rides_on_the_job_and_shows_in_jobs_show(hub, worker):
    repo = hub.unique_repo("org/polite")
    hub.add_repo(repo, big_files(2 * MiB))
    result, doc = run_json("pull", repo, "--max-rate", "1M")
    assert result.exit_code == 0, result.output
    job_id = doc["data"]["id"]
    assert doc["data"]["args"]["max_rate"] == 1e6
    started = time.monotonic()
    row = wait_for(lambda: job_row(job_id)["state"] in ("succeeded", "failed") and job_row(job_id), timeout=60)
    took = time.monotonic() - started
    assert row["state"] == "succeeded", row
    assert took >= 1.5, took   # 2 MiB at 1 MB/s is ~2.1 s (the 0.25 s burst allowance aside)
    shown = run("jobs", "show", job_id)
    assert '"max_rate": 1000000.0' in shown.stdout


def test_max_rate_from_the_environment(hub, isolated, monkeypatch, worker_manager):
    monkeypatch.setenv("MLXK_MAX_RATE", "20MB/s")
    monkeypatch.setenv("MLXK_PULL_CONNECTIONS", "3")
    repo = hub.unique_repo("org/envrate")
    hub.add_repo(repo, {"config.json": b"{}"})
    _result, doc = run_json("pull", repo)
    assert doc["data"]["args"]["max_rate"] == 20e6 and doc["data"]["args"]["connections"] == 3


@pytest.mark.parametrize("value", ["fast", "20X"])
def test_a_bad_max_rate_is_a_usage_error_naming_the_forms(worker_manager, value):
    result = run("pull", "org/whatever", "--max-rate", value)
    assert result.exit_code == 2
    assert "20M, 20MB/s, 500k or 8MiB" in result.output


def test_a_bad_environment_rate_names_the_variable(worker_manager, monkeypatch):
    monkeypatch.setenv("MLXK_MAX_RATE", "lots")
    result, doc = run_json("pull", "org/whatever")
    assert result.exit_code == 1 and "MLXK_MAX_RATE" in doc["error"]["message"]


def test_max_pulls_makes_the_second_pull_wait_for_a_slot(hub, worker, monkeypatch):
    monkeypatch.setenv("MLXK_MAX_PULLS", "1")
    hub.faults.rate_limit_bps = 1 * MiB
    first, second = hub.unique_repo("org/slot-a"), hub.unique_repo("org/slot-b")
    hub.add_repo(first, big_files(2 * MiB, seed=b"a"))
    hub.add_repo(second, big_files(2 * MiB, seed=b"b"))
    a = run("pull", first).stdout.strip()
    wait_for(lambda: job_row(a)["state"] == "running" and (job_row(a)["bytes_done"] or 0) > 0, timeout=30)
    b = run("pull", second).stdout.strip()
    waiting = wait_for(lambda: "waiting for a pull slot" in (job_row(b)["message"] or "") and job_row(b),
                       timeout=30)
    assert "MLXK_MAX_PULLS=1" in waiting["message"] and not waiting["bytes_done"]
    assert job_row(a)["state"] == "running"
    shown = run("jobs", "show", b)
    assert "waiting for a pull slot" in shown.stdout and '"max_pulls": 1' in shown.stdout
    hub.faults.rate_limit_bps = None
    for job_id in (a, b):
        row = wait_for(lambda: job_row(job_id)["state"] in ("succeeded", "failed") and job_row(job_id), timeout=60)
        assert row["state"] == "succeeded", row
