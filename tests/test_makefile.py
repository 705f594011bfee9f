"""`make run` installs only what running needs; the test extra (pytest, selenium, ...) comes with `make test` and
`make install` alone. Read from make's own dry run (-n), with every target out of date (-B)."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.fixtures.cli import ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def dry_run(target: str) -> str:
    return subprocess.run(["make", "-n", "-B", target], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=True).stdout


def test_make_run_installs_without_the_test_extra():
    commands = dry_run("run")
    assert "pip install --quiet -e .\n" in commands and "[test]" not in commands
    assert "honcho start" in commands


@pytest.mark.parametrize("target", ["test", "install"])
def test_make_test_and_install_add_the_test_extra(target):
    assert "pip install --quiet -e '.[test]'" in dry_run(target)
