"""A wrong command line under --json is still one JSON envelope on stdout (type `usage`, exit 2), and a mistyped
command gets the closest ones ("did you mean"), with or without --json."""
from __future__ import annotations

import json
import subprocess

import pytest

from tests.fixtures.cli import MLXK, run

USAGE_CASES = [
    # argv, envelope command, words of the message
    (["list", "--sort", "bogus"], "list", "Invalid value for '--sort': 'bogus'"),
    (["pull"], "pull", "Missing argument 'NAME'"),
    (["lsit"], None, "No such command 'lsit'. Did you mean 'list'?"),
    (["list", "--bogus"], "list", "No such option '--bogus'"),
    (["jobs", "shwo"], "jobs", "No such command 'shwo'. Did you mean 'show'?"),
    (["jobs", "cancel"], "jobs cancel", "Missing argument 'JOB_ID'"),
    (["processes", "stpo"], "processes", "Did you mean 'stop'?"),
    (["stop"], "stop", "give a MODEL or --all"),                      # raised by the command itself
    (["serve", "--port", "99999"], "serve", "99999 is not in the range 1<=x<=65535"),
    (["serve", "--api-key", "k", "--api-key-file", "f"], "serve", "not both"),
    (["worker", "--threads", "0"], "worker", "Invalid value for '--threads'"),
    (["push", "--private", "--public", ".", "org/x"], "push", "--private and --public"),
]


@pytest.mark.parametrize("argv, command, words", USAGE_CASES, ids=[" ".join(c[0]) for c in USAGE_CASES])
def test_a_usage_error_under_json_is_one_envelope(argv, command, words):
    result = run(*argv, "--json")

    assert result.exit_code == 2, result.output
    doc = json.loads(result.stdout)   # one document, nothing else on stdout
    assert doc["status"] == "error" and doc["command"] == command and doc["data"] is None
    assert doc["error"]["code"] == "usage" and words in doc["error"]["message"]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("argv", [c[0] for c in USAGE_CASES[:5]], ids=[" ".join(c[0]) for c in USAGE_CASES[:5]])
def test_without_json_a_usage_error_is_clicks_text_on_stderr(argv):
    result = run(*argv)
    assert result.exit_code == 2 and result.stdout == ""
    assert "Usage: " in result.stderr and "Error:" in result.stderr


def test_a_mistyped_command_gets_the_closest_ones():
    doc = json.loads(run("lsit", "--json").stdout)
    assert doc["error"]["suggestions"] == ["list"]
    assert doc["error"]["usage"].endswith(" [OPTIONS] COMMAND [ARGS]...")
    assert "Did you mean 'pull'?" in run("pul").stderr
    assert "Did you mean" not in run("zzzzzz").stderr   # nothing close: no guess


def test_the_installed_entry_point_prints_the_envelope(tmp_path):
    # main() (what the `mlxk` script runs), not only click's test runner
    result = subprocess.run([*MLXK, "lsit", "--json"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr == ""
    assert json.loads(result.stdout)["error"]["suggestions"] == ["list"]


def test_json_after_a_double_dash_is_an_argument_not_the_flag():
    result = run("show", "--", "--json")
    assert result.exit_code != 0 and not result.stdout.startswith("{")


def test_worker_is_listed_in_help():
    assert "\n  worker " in run("--help").stdout
