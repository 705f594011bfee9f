"""mlxk.output.dumps: the --json document, with RawJSON fragments (SQLite-rendered model objects) embedded as
values, compact for scripts and indented at a terminal."""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from mlxk import output
from mlxk.output import RawJSON


@pytest.mark.parametrize("tty", [False, True])
def test_raw_json_is_embedded_as_a_value_not_a_string(tty, monkeypatch):
    monkeypatch.setattr(output, "is_tty", lambda stream=None: tty)
    models = [{"name": "org/a", "reason": "tab\there, ünïcode, \"quotes\""}, {"name": "org/b", "reason": None}]
    document = {
        "models": RawJSON(json.dumps(models, ensure_ascii=False)),
        "other": RawJSON("{}"),
        # strings that look like the stand-ins stay strings
        "decoy": "\x00mlxk-raw-0-0\x00",
        "path": Path("/tmp/x"),
    }
    text = output.dumps(output.envelope("list", document))
    parsed = json.loads(text)
    assert parsed["data"] == {"models": models, "other": {}, "decoy": "\x00mlxk-raw-0-0\x00", "path": "/tmp/x"}
    assert ("\n" in text) == tty


def test_compact_dump_keeps_raw_text_byte_for_byte(monkeypatch):
    monkeypatch.setattr(output, "is_tty", lambda stream=None: False)
    raw = '[{"name":"org/ü","size_bytes":1}]'
    assert output.dumps({"models": RawJSON(raw), "count": 1}) == '{"models":' + raw + ',"count":1}'


@pytest.mark.parametrize("tty", [False, True])
def test_echo_json_writes_the_document_in_pieces_as_utf8(tty, monkeypatch, capsysbinary):
    """What `list --json` prints: dumps() and one newline, as UTF-8 bytes, a RawJSON given in pieces kept whole."""
    monkeypatch.setattr(output, "is_tty", lambda stream=None: tty)
    document = output.envelope("list", {"models": RawJSON("[", '{"name":"org/ü"},{"name":"org/b"}', "]"),
                                        "count": 2, "note": "ünïcode \x1b[31m"})
    output.echo_json(document)
    written = capsysbinary.readouterr().out
    assert written == (output.dumps(document) + "\n").encode("utf-8")
    assert json.loads(written)["data"]["models"] == [{"name": "org/ü"}, {"name": "org/b"}]
    assert b"\x1b" not in written   # a control character in a string is escaped, so nothing needs stripping


def test_echo_json_to_a_text_only_stdout(monkeypatch, capsys):
    """A stdout without a binary buffer (io.StringIO, as embedding code may set) gets the same text."""
    monkeypatch.setattr(output, "is_tty", lambda stream=None: False)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    document = output.envelope("list", {"models": RawJSON("[", '{"name":"org/ü"}', "]")})
    output.echo_json(document)
    assert sys.stdout.getvalue() == output.dumps(document) + "\n"
