"""The test-only pause points (mlxk.faults): a real process pauses at a named step, and only there."""
import os
import subprocess
import sys

from tests.fixtures.pause import kill_paused, release, wait_paused

SCRIPT = "from mlxk.faults import checkpoint; checkpoint('a.first'); checkpoint('b.second'); print('done')"


def _start(home, steps):
    env = {**os.environ, "MLXK_HOME": str(home), "MLXK_TEST_PAUSE_AT": steps}
    return subprocess.Popen([sys.executable, "-c", SCRIPT], env=env, stdout=subprocess.PIPE, text=True)


def test_pauses_at_named_step_until_released(tmp_path):
    proc = _start(tmp_path, "b.second")
    assert wait_paused(tmp_path, "b.second") == proc.pid
    assert proc.poll() is None
    release(tmp_path, "b.second")
    assert proc.communicate(timeout=30)[0].strip() == "done"


def test_kill_at_step(tmp_path):
    proc = _start(tmp_path, "a.first, b.second")
    assert kill_paused(tmp_path, "a.first") == proc.pid
    assert proc.wait(timeout=30) == -9
    assert not (tmp_path / "run" / "paused-b.second").exists()


def test_unarmed_steps_do_not_pause(tmp_path):
    proc = _start(tmp_path, "")
    assert proc.communicate(timeout=30)[0].strip() == "done"
    assert not (tmp_path / "run").exists()


def test_pauses_in_a_home_that_does_not_exist_yet_and_in_one_already_used(tmp_path):
    home = tmp_path / "not" / "yet"          # run/ and its parents are made on the first pause
    first = _start(home, "a.first")
    assert wait_paused(home, "a.first") == first.pid
    release(home, "a.first")
    assert first.communicate(timeout=30)[0].strip() == "done"
    again = _start(home, "a.first")          # run/ exists now: pausing again must not trip over it
    assert wait_paused(home, "a.first") == again.pid
    release(home, "a.first")
    assert again.communicate(timeout=30)[0].strip() == "done"
