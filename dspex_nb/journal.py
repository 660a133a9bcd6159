"""The batch journal: every finished item of a batch, written to SQLite (WAL) as it arrives.

A batch is keyed by what determines its answers: the program (signature or defined module, with
its source) and the LM with its settings; an item by its content. Re-running the same batch —
after a cancel, a worker crash, a kernel restart or a SIGKILLed kernel — takes the finished items
from here without calling the LM and runs only the rest. Only successful items are kept: a failed
item runs again next time.

Location: ``Journal(path)``, else ``$DSPEX_JOURNAL``, else ``~/.cache/dspex_nb/journal.sqlite3``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    batch_key TEXT PRIMARY KEY,
    description TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS items (
    batch_key TEXT NOT NULL,
    item_key TEXT NOT NULL,
    result TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (batch_key, item_key)
);
"""


def default_path() -> Path:
    return Path(os.environ.get("DSPEX_JOURNAL") or Path.home() / ".cache" / "dspex_nb" / "journal.sqlite3")


def digest(value: Any) -> str:
    """A stable key for a JSON-able value (dict keys sorted)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:32]


class Journal:
    """One SQLite file of batch results, safe to use from several threads of one process and from
    several processes at once (WAL)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a committed row survives a process kill
        self._db.executescript(SCHEMA)

    def open_batch(self, key: str, description: str) -> dict[str, dict[str, Any]]:
        """Register batch ``key``; return its finished results by item key."""
        now = time.time()
        with self._lock:
            self._db.execute("INSERT INTO batches VALUES (?, ?, ?, ?) ON CONFLICT(batch_key) DO UPDATE SET "
                             "updated = excluded.updated", (key, description, now, now))
            rows = self._db.execute("SELECT item_key, result FROM items WHERE batch_key = ?", (key,)).fetchall()
        return {item_key: json.loads(result) for item_key, result in rows}

    def record(self, batch_key: str, item_key: str, result: dict[str, Any]) -> None:
        """Keep one finished item (committed at once)."""
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO items VALUES (?, ?, ?, ?)",
                             (batch_key, item_key, json.dumps(result), time.time()))

    def batches(self) -> list[dict[str, Any]]:
        """Every journaled batch: key, description, items kept, created, updated."""
        with self._lock:
            rows = self._db.execute(
                "SELECT b.batch_key, b.description, COUNT(i.item_key), b.created, b.updated FROM batches b "
                "LEFT JOIN items i ON i.batch_key = b.batch_key GROUP BY b.batch_key ORDER BY b.updated").fetchall()
        return [{"key": k, "description": d, "items": n, "created": c, "updated": u} for k, d, n, c, u in rows]

    def clear(self, key: str | None = None) -> int:
        """Forget one batch (by key or key prefix), or every batch; returns how many were removed."""
        pattern = f"{key}%" if key else "%"
        with self._lock:
            removed = self._db.execute("DELETE FROM batches WHERE batch_key LIKE ?", (pattern,)).rowcount
            self._db.execute("DELETE FROM items WHERE batch_key LIKE ?", (pattern,))
        return removed

    def close(self) -> None:
        with self._lock:
            self._db.close()
