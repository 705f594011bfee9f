"""The prompt-prefix cache on disk through `mlxk serve`: every dialect reports what it restored, after the model was
unloaded (its memory cache gone), and /metrics and `mlxk ps` show the disk tier."""
from __future__ import annotations

import json
import re

import httpx
import pytest
from click.testing import CliRunner

from mlxk.cli import cli
from tests.fixtures.server import RANDOM_ID, spawn_server

# Long enough for the worker's defaults (prefixcache.MIN_TOKENS 256, blocks of 64) with the tiny tokenizer.
SYSTEM = " ".join(f"Rule {i}: keep every answer short, polite and on topic for the user." for i in range(40))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = spawn_server(tmp_path_factory.mktemp("prefix"), models={RANDOM_ID: {}})
    yield srv
    srv.stop()


def unload(server) -> None:
    assert httpx.post(f"{server.url}/api/stop", json={"model": None}, timeout=30).status_code == 200


def openai_cached(server, user: str) -> int:
    body = {"model": RANDOM_ID, "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]}
    reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120).json()
    return reply["usage"]["prompt_tokens_details"]["cached_tokens"]


def anthropic_cached(server, user: str) -> int:
    body = {"model": RANDOM_ID, "max_tokens": 4, "temperature": 0, "system": SYSTEM,
            "messages": [{"role": "user", "content": user}]}
    reply = httpx.post(f"{server.url}/v1/messages", json=body, timeout=120).json()
    return reply["usage"]["cache_read_input_tokens"]


def responses_cached(server, user: str) -> int:
    body = {"model": RANDOM_ID, "max_output_tokens": 4, "temperature": 0, "instructions": SYSTEM, "input": user}
    reply = httpx.post(f"{server.url}/v1/responses", json=body, timeout=120).json()
    return reply["usage"]["input_tokens_details"]["cached_tokens"]


def test_every_dialect_reports_the_prefix_restored_from_disk_after_an_unload(server, monkeypatch):
    assert openai_cached(server, "first question") == 0
    for n, dialect in enumerate((anthropic_cached, responses_cached, openai_cached)):
        unload(server)                                   # the memory cache goes with the model; the disk stays
        assert dialect(server, f"question {n}") >= 256, dialect.__name__

    text = httpx.get(f"{server.url}/metrics").text
    values = dict(re.findall(r"^(mlxk_prefix_cache_[a-z_]+) (\S+)$", text, re.M))
    assert int(values["mlxk_prefix_cache_disk_hits_total"]) >= 3
    assert int(values["mlxk_prefix_cache_disk_bytes"]) > 0
    assert float(values["mlxk_prefix_cache_disk_hit_ratio"]) > 0.5
    assert 0 < float(values["mlxk_prefix_cache_hit_ratio"]) < 1
    assert int(values["mlxk_prefix_cache_disk_max_bytes"]) == 10 * 10**9

    for name in ("MLXK_HOME", "HF_HOME", "HF_HUB_CACHE", "MLXK_PORT"):
        monkeypatch.setenv(name, server.env[name])
    doc = json.loads(CliRunner().invoke(cli, ["ps", "--json"]).stdout)
    prefix = doc["data"]["prefix_cache"]
    assert prefix["enabled"] and prefix["hits"] >= 3 and prefix["bytes"] > 0
    human = CliRunner().invoke(cli, ["ps"]).stdout
    assert re.search(r"prefix cache on disk: [\d.]+ [KMG]?B of 10\.0 GB \(\d+ blocks\), hit ratio \d+%", human), human
