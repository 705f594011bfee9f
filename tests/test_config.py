from pathlib import Path

import pytest

from mlxk.config import settings
from mlxk.errors import ConfigError


def test_hf_cache_follows_huggingface_hub_rules(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "explicit"))
    assert settings().hf_hub_cache == tmp_path / "explicit"
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert settings().hf_hub_cache == tmp_path / "home" / "hub"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert settings().hf_hub_cache == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert settings().hf_hub_cache == Path.home() / ".cache" / "huggingface" / "hub"


def test_state_lives_in_mlxk_home(isolated):
    s = settings()
    assert s.home == isolated
    assert s.state_db == isolated / "state.db" and s.queue_db == isolated / "queue.db"
    assert s.queue_url == str(isolated / "queue.db")


def test_token_from_env_then_saved_login(monkeypatch, tmp_path):
    assert settings().hf_token is None
    (settings().hf_home).mkdir(parents=True, exist_ok=True)
    (settings().hf_home / "token").write_text("hf_saved\n")
    assert settings().hf_token == "hf_saved"
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    assert settings().hf_token == "hf_env"


def test_long_home_gets_a_short_socket_path(monkeypatch, tmp_path):
    monkeypatch.setenv("MLXK_HOME", str(tmp_path / ("x" * 120)))
    assert len(str(settings().inference_socket)) < 100


def test_bad_number_names_the_variable(monkeypatch):
    monkeypatch.setenv("MLXK_PORT", "eighty")
    with pytest.raises(ConfigError, match="MLXK_PORT"):
        settings()


@pytest.mark.parametrize("raw, seconds", [
    ("300", 300.0), ("-1", -1.0), ("30s", 30.0), ("10m", 600.0), ("1h30m", 5400.0), ("-1m", -60.0),
    ("500ms", 0.5), ("1.5h", 5400.0), (90, 90.0), (-1, -1.0),
])
def test_durations_in_seconds_negative_is_forever(raw, seconds):
    from mlxk.config import parse_duration

    assert parse_duration(raw) == seconds


@pytest.mark.parametrize("raw", ["1x", "h", "1h 30m", "--1m", "", "nan", "inf", True, None])
def test_bad_durations_name_the_forms(raw):
    from mlxk.config import parse_duration

    with pytest.raises(ValueError, match="1h30m|finite|string"):
        parse_duration(raw)


def test_keep_alive_env_takes_durations_and_forever(monkeypatch):
    for raw, seconds in (("-1", -1.0), ("10m", 600.0)):
        monkeypatch.setenv("MLXK_KEEP_ALIVE", raw)
        assert settings().keep_alive_s == seconds
    monkeypatch.setenv("MLXK_KEEP_ALIVE", "soon")
    with pytest.raises(ConfigError, match="MLXK_KEEP_ALIVE.*1h30m"):
        settings()
@pytest.mark.parametrize("value", ["soon", "0", "-1"])
def test_worker_timeouts_must_be_positive_seconds(monkeypatch, value):
    for name in ("MLXK_WORKER_TIMEOUT", "MLXK_WORKER_REPLACE_AFTER"):
        monkeypatch.setenv(name, value)
        with pytest.raises(ConfigError, match=name):
            settings()
        monkeypatch.delenv(name)
    assert (settings().worker_timeout_s, settings().worker_replace_s) == (5.0, 30.0)
