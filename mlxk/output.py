"""Everything a command prints: the --json envelope, aligned tables, sizes, times, errors.

Data goes to stdout, chatter and progress to stderr. Every command takes `--json` and prints exactly one JSON
document: {"status": "success"|"error", "command": ..., "data": ..., "error": null|{"type", "message", ...}}.
Commands return an `Output`; they never print, exit or format errors themselves.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import click

from mlxk.clock import iso_utc, parse_iso  # noqa: F401 - re-exported for renderers
from mlxk.errors import MlxkError, UsageError, cli_error
from mlxk.units import human_size  # noqa: F401 - re-exported for renderers


@dataclass
class Output:
    data: Any = None
    text: str | Callable[[], str] | None = None   # the human rendering; None prints nothing
    exit_code: int = 0
    error: MlxkError | None = None                 # a failed outcome that still carries data (a failed job)


def json_mode() -> bool:
    ctx = click.get_current_context(silent=True)
    while ctx is not None:
        if ctx.meta.get("mlxk.json"):
            return True
        ctx = ctx.parent
    return False


def envelope(command: str, data: Any = None, error: MlxkError | None = None) -> dict:
    """The --json document. `error.type` speaks mlx-knife's vocabulary and `error.code` is mlxk's own type
    (mlxk.errors.cli_error, the one table)."""
    return {
        "status": "error" if error else "success",
        "command": command,
        "data": data,
        "error": cli_error(error, command) if error else None,
    }


def _command_name(ctx: click.Context) -> str:
    return " ".join(ctx.command_path.split()[1:]) or ctx.command_path


class RawJSON:
    """JSON text made elsewhere (SQLite's json_object() for `list`) that dumps() embeds as a value, not a string; given
    as pieces whose concatenation is the text (`list` passes "[", its objects joined, "]": no copy to join them)."""

    __slots__ = ("parts",)

    def __init__(self, *parts: str):
        self.parts = parts

    @property
    def text(self) -> str:
        return "".join(self.parts)


def dumps(document: Any) -> str:
    """Indented for a person at a terminal; compact (the C encoder, several times faster) for scripts."""
    return "".join(dump_parts(document))


def dump_parts(document: Any) -> list[str]:
    """dumps(document) as pieces, each RawJSON's own pieces kept apart, so echo_json writes a `list --json` of 10,000
    repos (~8 MB) without joining it into one more string first."""
    if is_tty():
        return [json.dumps(document, indent=2, ensure_ascii=False,
                           default=lambda value: json.loads(value.text) if isinstance(value, RawJSON) else str(value))]
    raws: dict[str, tuple[str, ...]] = {}

    def stand_in(value):
        if not isinstance(value, RawJSON):
            return str(value)
        key = f"\0mlxk-raw-{id(raws)}-{len(raws)}\0"  # NUL-delimited: no string in the document spells it
        raws[json.dumps(key)] = value.parts
        return key

    rest = json.dumps(document, ensure_ascii=False, default=stand_in, separators=(",", ":"))
    parts = []
    for key, raw in raws.items():   # in document order, each key once
        head, _, rest = rest.partition(key)
        parts += [head, *raw]
    parts.append(rest)
    return parts


def echo_json(document: Any) -> None:
    """dumps(document) and a newline on stdout as UTF-8 (what RFC 8259 asks of JSON), piece by piece: click.echo of one
    8 MB str would copy it to add the newline, again to strip ANSI codes (JSON has none: json.dumps and SQLite escape
    control characters) and again to encode it."""
    parts = dump_parts(document)
    binary = getattr(sys.stdout, "buffer", None)
    if binary is None:   # a text-only stdout (io.StringIO): one str, as click.echo writes it
        click.echo("".join(parts))
        return
    sys.stdout.flush()
    for part in parts:
        binary.write(part.encode())
    binary.write(b"\n")
    binary.flush()


def json_command(fn):
    """Give a command `--json`, render its Output, and turn MlxkError into a clear message and exit 1."""

    @click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
    @functools.wraps(fn)
    def wrapper(*args, as_json: bool, **kwargs):
        ctx = click.get_current_context()
        ctx.meta["mlxk.json"] = as_json
        name = _command_name(ctx)
        try:
            result = fn(*args, **kwargs)
        except MlxkError as error:
            result = Output(exit_code=error.exit_code, error=error)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)
        if result is None:
            result = Output()
        if as_json:
            echo_json(envelope(name, result.data, result.error))
        else:
            text = result.text() if callable(result.text) else result.text
            if text:
                click.echo(text)
            if result.error:
                click.echo(f"Error: {result.error.message}", err=True)
        code = result.exit_code or (result.error.exit_code if result.error else 0)
        if code:
            ctx.exit(code)

    return wrapper


def json_requested(args) -> bool:
    """Did the command line ask for --json (before a `--`)? Read from the raw arguments, because a usage error
    stops click before any command has parsed its options."""
    args = list(args)
    return "--json" in (args[:args.index("--")] if "--" in args else args)


def usage_error(error: click.ClickException) -> MlxkError:
    """A click error as the mlxk error the envelope carries: `usage` (exit 2) for a wrong command line, with the
    command's usage line and click's close matches (`suggestions`) where it has them."""
    if not isinstance(error, click.UsageError):
        return MlxkError(error.format_message())
    details = {}
    if error.ctx is not None:
        details["usage"] = error.ctx.get_usage()
    suggestions = getattr(error, "possibilities", None)
    if suggestions:
        details["suggestions"] = sorted(suggestions)
    return UsageError(error.format_message(), **details)


class JsonUsageError(click.UsageError):
    """A click error of a command line that asked for --json: shown as the one envelope on stdout, not as click's
    usage text on stderr; the exit code stays click's (2 for usage)."""

    def __init__(self, error: click.ClickException):
        super().__init__(error.format_message(), getattr(error, "ctx", None))
        self.exit_code = error.exit_code
        self.original = error

    def show(self, file=None) -> None:
        ctx = self.ctx
        command = _command_name(ctx) if ctx is not None and ctx.parent is not None else None
        click.echo(dumps(envelope(command, None, usage_error(self.original))))


def system_object() -> dict | None:
    """mlx-knife's `system` object of `version` and `list`: physical memory in bytes, None where the platform
    does not say."""
    try:
        return {"memory_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}
    except (ValueError, OSError, AttributeError):
        return None


def say(message: str) -> None:
    """Chatter for humans: stderr, so stdout stays data."""
    click.echo(message, err=True)


# ---------------------------------------------------------------- formatting

def relative_time(ts: float | str | None, now: float | None = None) -> str:
    if ts is None:
        return "-"
    if isinstance(ts, str):
        ts = parse_iso(ts)
    delta = (now or time.time()) - ts
    future = delta < 0
    delta = abs(delta)
    for size, unit in ((86400 * 365, "year"), (86400 * 30, "month"), (86400 * 7, "week"), (86400, "day"),
                       (3600, "hour"), (60, "minute"), (1, "second")):
        if delta >= size:
            count = int(delta // size)
            text = f"{count} {unit}{'s' if count != 1 else ''}"
            return f"in {text}" if future else f"{text} ago"
    return "just now"


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def table(rows: list[list[Any]], headers: list[str], *, right: set[int] = frozenset()) -> str:
    """An aligned plain-text table; columns in `right` are right-aligned (sizes, counts)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def is_tty(stream=None) -> bool:
    stream = stream or sys.stdout
    return hasattr(stream, "isatty") and stream.isatty()
