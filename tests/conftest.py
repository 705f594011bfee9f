"""Every test runs in its own MLXK_HOME and HF cache under tmp_path, never the user's, never the network."""
from __future__ import annotations

import signal

import pytest

# A shell starts a background job (`make test &`, `nohup ... &`, some CI runners) with SIGINT ignored, and an
# ignored signal stays ignored across exec: every process the suite starts would then shrug off Ctrl-C, and the
# tests that press it (pull --wait, the chat, make run) would fail for the harness's sake. The suite's processes get
# the default handling, as in a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

pytest_plugins = [
    "tests.fixtures.browser",
    "tests.fixtures.cache",
    "tests.fixtures.hub",
    "tests.fixtures.queue",
    "tests.fixtures.server",
]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    home = tmp_path / "mlxk"
    hf_home = tmp_path / "hf"
    monkeypatch.setenv("MLXK_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("HF_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE", "MLXK_QUEUE_URL", "MLXK_API_KEY", "HF_TOKEN_PATH",
                 "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME", "MLXK_HOST"):
        monkeypatch.delenv(name, raising=False)
    # A bare HOME too, so nothing falls back to the real ~/.cache/huggingface.
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    # `mlxk list` and job commands start a job worker in the background when none is alive: keep it short-lived
    # and reap it when the test ends, so no test leaves processes behind.
    monkeypatch.setenv("MLXK_WORKER_IDLE", "5")
    yield home
    from tests.fixtures.queue import reap_background_workers

    reap_background_workers(home)
