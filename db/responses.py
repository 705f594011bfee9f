"""Named queries on the `responses` table: OpenAI Responses API objects stored with `store: true`.

A row keeps the Response as answered (for GET /v1/responses/{id}) and the conversation as chat messages, its own
output included (what `previous_response_id` continues from). Rows older than KEEP_DAYS are pruned whenever a new
one is saved; DELETE /v1/responses/{id} removes one at once.
"""
from __future__ import annotations

import json
import time

from mlxk.db import write
from .models import _conn

KEEP_DAYS = 30


def save_response(db, *, id: str, model: str, created_at: float, body: dict, messages: list,
                  keep_days: float = KEEP_DAYS) -> None:
    conn = _conn(db)
    with write(conn):
        conn.execute("DELETE FROM responses WHERE created_at < ?", (time.time() - keep_days * 86400,))
        conn.execute("INSERT OR REPLACE INTO responses (id, created_at, model, body, messages) VALUES (?, ?, ?, ?, ?)",
                     (id, created_at, model, json.dumps(body, ensure_ascii=False),
                      json.dumps(messages, ensure_ascii=False)))


def get_response(db, id: str) -> dict | None:
    """{"id", "created_at", "model", "body": dict, "messages": list}, or None."""
    row = _conn(db).execute("SELECT id, created_at, model, body, messages FROM responses WHERE id = ?",
                            (id,)).fetchone()
    if row is None:
        return None
    return {"id": row[0], "created_at": row[1], "model": row[2], "body": json.loads(row[3]),
            "messages": json.loads(row[4])}


def delete_response(db, id: str) -> bool:
    conn = _conn(db)
    with write(conn):
        return conn.execute("DELETE FROM responses WHERE id = ?", (id,)).rowcount > 0
