"""One logging set-up for every mlxk process (api server, job worker, inference worker), with redaction.

Why one module: a secret must never reach a log file, whichever process or library wrote the line, so redaction
lives in the one formatter every handler uses rather than at each call site. The formatter redacts the finished
line (message, arguments and traceback alike):

- Hugging Face tokens (`hf_...`), `Bearer <value>`, the value of any `Authorization` header or field, and the
  secrets this process knows (the configured API key, the HF token) become `[REDACTED]`;
- the user's home directory becomes `~` (a log attached to a bug report does not name the user).

`--log-json` (MLXK_LOG_JSON) writes one JSON object per line: `ts` (UTC, ISO 8601), `level`, `logger`, `msg`,
`pid`, and `request_id` / `job_id` when the line was written while serving that request or running that job
(context variables set by the api's RequestContext middleware and by the job runner). uvicorn's access log goes
through the same handler, so it is in the same format and carries the request id too.

The level and format are exported to the environment (config.export_log_settings), so the processes a process
starts (the inference worker, a background job worker) log the same way.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

from mlxk.config import export_log_settings, settings

REDACTED = "[REDACTED]"

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("mlxk_request_id", default=None)
job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("mlxk_job_id", default=None)

# Order matters: a header's whole value first, then Bearer values and tokens anywhere else in the line.
_PATTERNS = (
    # Authorization: <anything up to the end of the value>, as a header line, a dict item or a tuple of bytes
    (re.compile(r"""(?i)(authorization['"]?\s*[:=,]\s*(?:b?['"])?)[^'"\r\n,}\])]+"""), rf"\g<1>{REDACTED}"),
    (re.compile(r"(?i)\b(bearer)\s+[^\s'\",;\\)\]}]+"), rf"\g<1> {REDACTED}"),
    (re.compile(r"\bhf_[A-Za-z0-9]{6,}"), REDACTED),
)


class Redactor:
    """`redact(text)` -> text without tokens, Authorization values, known secrets or the home directory."""

    def __init__(self, secrets: Iterable[str | None] = (), home: str | Path | None = None):
        # Longest first, so a secret containing another is removed whole; very short values would eat ordinary text.
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)
        home = str(home) if home is not None else None
        self.home = re.compile(re.escape(home.rstrip("/")) + r"(?=/|\b|$)") if home and home.rstrip("/") else None

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        if self.home is not None:
            text = self.home.sub("~", text)
        return text


class Formatter(logging.Formatter):
    """Text (`ts level logger: msg`) or JSON lines; either way the finished line is redacted."""

    def __init__(self, *, json_lines: bool, redactor: Redactor):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.json_lines = json_lines
        self.redact = redactor

    def format(self, record: logging.LogRecord) -> str:
        context = {"request_id": request_id.get(), "job_id": job_id.get()}
        if not self.json_lines:
            line = super().format(record)
            ids = " ".join(f"{k}={v}" for k, v in context.items() if v)
            return self.redact(f"{line} [{ids}]" if ids else line)
        entry = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                 + f".{int(record.msecs):03d}Z",
                 "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage(),
                 "pid": record.process}
        entry.update({k: v for k, v in context.items() if v})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return self.redact(json.dumps(entry, ensure_ascii=False, default=str))


_installed: logging.Handler | None = None


def setup(level: str | None = None, json_lines: bool | None = None, *, secrets: Iterable[str | None] = (),
          stream=None) -> logging.Handler:
    """Send every logger (ours, uvicorn's, huey's) through one redacting handler on stderr; idempotent.

    `level` / `json_lines` default to MLXK_LOG_LEVEL / MLXK_LOG_JSON and are exported for child processes.
    `secrets` are values to redact besides the configured API key and HF token (a key given as a flag).
    Raises ConfigError for a bad MLXK_LOG_LEVEL.
    """
    global _installed

    s = settings()
    level = (level or s.log_level).lower()
    json_lines = s.log_json if json_lines is None else json_lines
    export_log_settings(level, json_lines)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(Formatter(json_lines=json_lines,
                                   redactor=Redactor([s.api_key, s.hf_token, *secrets], home=Path.home())))
    root = logging.getLogger()
    for old in list(root.handlers):  # basicConfig's or ours from an earlier call: one handler, one format
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "huey"):  # no handlers of their own: one format
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    _installed = handler
    return handler


@contextlib.contextmanager
def job_context(job: str) -> Iterator[None]:
    """Lines logged inside carry `job_id`."""
    token = job_id.set(job)
    try:
        yield
    finally:
        job_id.reset(token)
