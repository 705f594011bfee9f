"""The bench scripts run as executables: their shebang's python3 is not the project's, so importing bench/_common
(first, before anything third-party) re-executes them under .venv/bin/python."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.cli import ROOT

BENCHES = sorted(p.name for p in (ROOT / "bench").iterdir() if p.is_file() and not p.suffix and p.name != "README")
# The interpreter the venv was made from, with -S: no site-packages, so httpx, mlx and mlxk cannot be imported
# there, as under a system python3.
BARE = [str(Path(sys.base_prefix) / "bin" / "python3"), "-S"]


def test_every_bench_script_is_covered():
    assert {"knife", "list", "prefix", "pull", "serve"} <= set(BENCHES)


@pytest.mark.parametrize("name", BENCHES)
def test_a_bench_script_run_by_another_python_reexecutes_in_the_project_venv(name):
    assert subprocess.run([*BARE, "-c", "import httpx"], capture_output=True).returncode != 0
    done = subprocess.run([*BARE, str(ROOT / "bench" / name), "--help"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:")


def test_common_imports_nothing_third_party_before_the_reexec():
    source = (ROOT / "bench" / "_common.py").read_text()
    head = source[:source.index("_reexec_in_project_venv()\n")]
    imported = {line.split()[1].split(".")[0] for line in head.splitlines() if line.startswith(("import ", "from "))}
    assert imported <= {"__future__", "os", "subprocess", "sys", "tempfile", "pathlib"}, imported
