"""Every environment variable mlxk reads, in one place.

Values are read when `settings()` is called, never at import, so a test (or a long-lived process) that changes
the environment sees the change. Paths follow huggingface_hub's own rules so mlxk and `hf` share one cache.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import NamedTuple

DEFAULT_PORT = 8000
DEFAULT_HOST = "127.0.0.1"
DEFAULT_ENDPOINT = "https://huggingface.co"


class Settings(NamedTuple):  # immutable; a NamedTuple because a frozen dataclass costs every command ~1 ms to define
    home: Path                 # MLXK_HOME: state.db, queue.db, logs, pid files
    hf_home: Path              # HF_HOME
    hf_hub_cache: Path         # HF_HUB_CACHE, else HF_HOME/hub
    hf_endpoint: str           # HF_ENDPOINT
    hf_token: str | None       # HF_TOKEN, else the token `hf auth login` saved
    queue_url: str             # MLXK_QUEUE_URL: sqlite path (default) or redis://
    host: str                  # MLXK_HOST
    port: int                  # MLXK_PORT
    api_key: str | None        # MLXK_API_KEY
    cors_origins: tuple[str, ...]  # MLXK_CORS_ORIGINS (comma separated); empty = CORS off
    max_loaded: int            # MLXK_MAX_LOADED: models resident in the inference worker
    keep_alive_s: float        # MLXK_KEEP_ALIVE: seconds (or a duration) an idle model stays loaded; < 0 = forever
    max_waiting: int           # MLXK_MAX_WAITING: queued generation requests before "busy"
    max_prompt_tokens: int     # MLXK_MAX_PROMPT_TOKENS
    max_body_bytes: int        # MLXK_MAX_BODY_BYTES: request body limit of the api
    worker_idle_s: float       # MLXK_WORKER_IDLE: a background job worker exits after this idle time
    server_idle_s: float       # MLXK_SERVER_IDLE: a server started by `mlxk run` exits after this idle time
    hub_offline: bool          # HF_HUB_OFFLINE
    inference_external: bool   # MLXK_INFERENCE_EXTERNAL: the api uses a worker started by others, never its own
    started_by: str | None     # MLXK_STARTED_BY: who started this process (`mlxk processes` shows it); unset = a user
    worker_timeout_s: float    # MLXK_WORKER_TIMEOUT: an inference worker silent to pings this long is unresponsive
    worker_replace_s: float    # MLXK_WORKER_REPLACE_AFTER: an unresponsive worker of the api's own is killed after this
    allowed_hosts: tuple[str, ...] = ()  # MLXK_ALLOWED_HOSTS (comma separated): Host names the api answers too
    log_level: str = "info"    # MLXK_LOG_LEVEL: debug | info | warning | error
    log_json: bool = False     # MLXK_LOG_JSON: one JSON object per log line
    pull_connections: int = 8  # MLXK_PULL_CONNECTIONS: ranged connections per large file of a pull
    max_rate: float = 0.0      # MLXK_MAX_RATE: bandwidth cap of one pull in bytes/s ("20M"); 0 = none
    max_pulls: int = 0         # MLXK_MAX_PULLS: pulls running at once on this MLXK_HOME; 0 = no limit
    prefix_cache_bytes: int = 10 * 10**9  # MLXK_PREFIX_CACHE_BYTES: prompt-prefix KV cache on disk ("10G"); 0 = off

    @property
    def prefix_cache_dir(self) -> Path:
        """The prompt-prefix KV cache on disk (workers/inference/prefixcache.py); deleting it clears the cache."""
        return self.home / "prefix-cache"

    @property
    def state_db(self) -> Path:
        return self.home / "state.db"

    @property
    def queue_db(self) -> Path:
        return self.home / "queue.db"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    @property
    def run_dir(self) -> Path:
        """pid and heartbeat files of the processes mlxk starts."""
        return self.home / "run"

    @property
    def chat_history(self) -> Path:
        """What was typed into `mlxk run`'s chat, kept across sessions (arrow up recalls it)."""
        return self.home / "chat_history"

    @property
    def inference_socket(self) -> Path:
        """Unix socket of the inference worker; sockets paths are capped at ~104 bytes, so long homes hash."""
        path = self.home / "inference.sock"
        if len(str(path)) < 100:
            return path
        import hashlib  # lazy: keeps `mlxk list` light
        import tempfile  # lazy: keeps `mlxk list` light

        digest = hashlib.sha1(str(self.home).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"mlxk-{os.getuid()}-{digest}.sock"

    @property
    def server_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else None


def _default_home() -> Path:
    from platformdirs import user_data_dir  # lazy: keeps `mlxk list` light

    return Path(user_data_dir("mlxk", appauthor=False))


def default_home() -> Path:
    """MLXK_HOME when it is not set (what a process started without it uses)."""
    return _default_home()


def _hf_home() -> Path:
    if (value := _env("HF_HOME")) is not None:
        return Path(value).expanduser()
    xdg = _env("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface"


def _hf_token(hf_home: Path) -> str | None:
    if (token := _env("HF_TOKEN")) is not None:
        return token.strip()
    token_path = Path(_env("HF_TOKEN_PATH") or hf_home / "token").expanduser()
    try:
        return token_path.read_text().strip() or None
    except OSError:
        return None


def _number(name: str, default: float, kind=float):
    raw = _env(name)
    if raw is None:
        return default
    try:
        return kind(raw)
    except ValueError:
        from mlxk.errors import ConfigError

        raise ConfigError(f"{name}={raw!r} is not a number; unset it or give a number like {default!r}") from None


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value) -> float:
    """Seconds from a number or an ollama (Go) duration: 300, "-1", "30s", "10m", "1h30m", "-1m", "500ms".

    A negative duration means forever (ollama's keep_alive); the callers decide what that means for them.
    Raises ValueError naming the accepted forms.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        sign, body = (-1.0, text[1:]) if text.startswith("-") else (1.0, text.removeprefix("+"))
        try:
            seconds = float(text)
        except ValueError:
            parts = _DURATION_PART.findall(body)
            if not parts or "".join(n + u for n, u in parts) != body:
                raise ValueError(f"{value!r} is not a duration: give seconds (300, -1) or a duration like "
                                 "'30s', '10m', '1h30m' ('-1' or any negative value: forever)") from None
            seconds = sign * sum(float(n) * _UNIT_S[u] for n, u in parts)
    else:
        raise ValueError(f"{value!r} is not a duration: give seconds (300, -1) or a string like '10m'")
    if not math.isfinite(seconds):
        raise ValueError(f"{value!r} is not a finite duration; use -1 for forever")
    return seconds


def _duration(name: str, default: float) -> float:
    raw = _env(name)
    if raw is None:
        return default
    try:
        return parse_duration(raw)
    except ValueError as error:
        from mlxk.errors import ConfigError

        raise ConfigError(f"{name}: {error}") from None
def _positive(name: str, default: float) -> float:
    value = _number(name, default)
    if not value > 0:
        from mlxk.errors import ConfigError

        raise ConfigError(f"{name}={value!r} must be a positive number of seconds, like {default!r}")
    return value


_RATE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmg]i?)?b?(?:/s|ps)?\s*$", re.IGNORECASE)
_RATE_UNIT = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def parse_rate(value) -> float:
    """Bytes per second from `20M`, `20MB/s`, `500k`, `1.5G`, `8MiB` or a plain number of bytes (0: no cap).

    K/M/G are decimal (the units of a network link), Ki/Mi/Gi binary. Raises ValueError naming the accepted forms.
    """
    match = _RATE.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a rate: give bytes per second like 20M, 20MB/s, 500k or 8MiB (0: no cap)")
    return float(match.group(1)) * _RATE_UNIT[(match.group(2) or "").lower()]


def _rate(name: str) -> float:
    raw = _env(name)
    if raw is None:
        return 0.0
    try:
        return parse_rate(raw)
    except ValueError as error:
        from mlxk.errors import ConfigError

        raise ConfigError(f"{name}: {error}") from None


_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmg]i?)?b?\s*$", re.IGNORECASE)


def parse_size(value) -> int:
    """Bytes from `10G`, `10GB`, `500M`, `8GiB` or a plain number of bytes; the units of parse_rate (K/M/G decimal,
    Ki/Mi/Gi binary). Raises ValueError naming the accepted forms."""
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a size: give bytes like 10G, 500MB, 8GiB or a plain number (0: off)")
    return int(float(match.group(1)) * _RATE_UNIT[(match.group(2) or "").lower()])


def _size(name: str, default: int) -> int:
    raw = _env(name)
    if raw is None:
        return default
    try:
        return parse_size(raw)
    except ValueError as error:
        from mlxk.errors import ConfigError

        raise ConfigError(f"{name}: {error}") from None


def _count(name: str, default: int, *, least: int) -> int:
    value = _number(name, default, int)
    if value < least:
        from mlxk.errors import ConfigError

        raise ConfigError(f"{name}={value!r} must be a whole number >= {least}, like {default!r}")
    return value


def _port() -> int:
    port = _number("MLXK_PORT", DEFAULT_PORT, int)
    if not 1 <= port <= 65535:
        from mlxk.errors import ConfigError

        raise ConfigError(f"MLXK_PORT={port} is not a TCP port; give one from 1 to 65535, like {DEFAULT_PORT}")
    return port


def _flag(name: str) -> bool:
    return (_env(name) or "").strip().lower() in {"1", "true", "yes", "on"}


LOG_LEVELS = ("debug", "info", "warning", "error")


def _log_level() -> str:
    level = (_env("MLXK_LOG_LEVEL") or "info").strip().lower()
    if level not in LOG_LEVELS:
        from mlxk.errors import ConfigError

        raise ConfigError(f"MLXK_LOG_LEVEL={level!r} is not a log level; use one of {', '.join(LOG_LEVELS)}")
    return level


def export_log_settings(level: str, json_lines: bool) -> None:
    """Write the log options into this process's environment, so every child it starts logs the same way."""
    os.environ["MLXK_LOG_LEVEL"] = level
    os.environ["MLXK_LOG_JSON"] = "1" if json_lines else "0"


def _list(name: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in (_env(name) or "").split(",") if item.strip())


def test_pause_at() -> frozenset[str]:
    """MLXK_TEST_PAUSE_AT: comma-separated named steps where a process pauses (tests only; see mlxk.faults)."""
    return frozenset(s.strip() for s in (_env("MLXK_TEST_PAUSE_AT") or "").split(",") if s.strip())


def settings() -> Settings:
    home = Path(_env("MLXK_HOME") or _default_home()).expanduser()
    hf_home = _hf_home()
    hub_cache = Path(_env("HF_HUB_CACHE") or _env("HUGGINGFACE_HUB_CACHE") or hf_home / "hub").expanduser()
    return Settings(
        home=home,
        hf_home=hf_home,
        hf_hub_cache=hub_cache,
        hf_endpoint=(_env("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/"),
        hf_token=_hf_token(hf_home),
        queue_url=_env("MLXK_QUEUE_URL") or str(home / "queue.db"),
        host=_env("MLXK_HOST") or DEFAULT_HOST,
        port=_port(),
        api_key=_env("MLXK_API_KEY"),
        cors_origins=_list("MLXK_CORS_ORIGINS"),
        max_loaded=_number("MLXK_MAX_LOADED", 1, int),
        keep_alive_s=_duration("MLXK_KEEP_ALIVE", 300.0),
        max_waiting=_number("MLXK_MAX_WAITING", 64, int),
        max_prompt_tokens=_number("MLXK_MAX_PROMPT_TOKENS", 32768, int),
        max_body_bytes=_number("MLXK_MAX_BODY_BYTES", 8 * 1024 * 1024, int),
        worker_idle_s=_number("MLXK_WORKER_IDLE", 300.0),
        server_idle_s=_number("MLXK_SERVER_IDLE", 900.0),
        hub_offline=_flag("HF_HUB_OFFLINE"),
        inference_external=_flag("MLXK_INFERENCE_EXTERNAL"),
        allowed_hosts=tuple(host.lower() for host in _list("MLXK_ALLOWED_HOSTS")),
        log_level=_log_level(),
        log_json=_flag("MLXK_LOG_JSON"),
        worker_timeout_s=_positive("MLXK_WORKER_TIMEOUT", 5.0),
        worker_replace_s=_positive("MLXK_WORKER_REPLACE_AFTER", 30.0),
        started_by=_env("MLXK_STARTED_BY"),
        pull_connections=_count("MLXK_PULL_CONNECTIONS", 8, least=1),
        max_rate=_rate("MLXK_MAX_RATE"),
        max_pulls=_count("MLXK_MAX_PULLS", 0, least=0),
        prefix_cache_bytes=_size("MLXK_PREFIX_CACHE_BYTES", 10 * 10**9),
    )


# Paths a child process must see as the parent does, although it runs in another working directory.
_PATH_VARS = ("MLXK_HOME", "HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME", "HF_TOKEN_PATH")


def child_env(started_by: str) -> dict[str, str]:
    """The environment of a background process mlxk starts: ours, with every path variable made absolute (the child
    runs in another directory, see mlxk.processes) and MLXK_STARTED_BY naming who started it."""
    env = dict(os.environ)
    for name in _PATH_VARS:
        if (value := _env(name)) is not None:
            env[name] = os.path.abspath(os.path.expanduser(value))
    env["MLXK_STARTED_BY"] = started_by
    return env
