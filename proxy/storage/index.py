"""The URL and tag index beside the disk tier: purge by URL, prefix or tag without a scan.

A small SQLite database (stdlib ``sqlite3``) in the cache directory maps keys to
their URL and tags. It may hold rows for entries the disk tier has since culled;
purging such a row is a harmless no-op, and rows are deleted with their entry.
"""

from __future__ import annotations

import os
import sqlite3
import threading

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, url TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS entries_url ON entries (url);
CREATE TABLE IF NOT EXISTS tags (tag TEXT NOT NULL, key TEXT NOT NULL, PRIMARY KEY (tag, key));
CREATE INDEX IF NOT EXISTS tags_key ON tags (key);
"""


class UrlTagIndex:
    def __init__(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        self._file = os.path.join(path, "index.sqlite3")
        self._local = threading.local()
        with self._db() as db:
            db.executescript(_SCHEMA)

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self._file, timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    def add(self, key: str, url: str, tags: tuple[str, ...]) -> None:
        db = self._db()
        db.execute("BEGIN")
        try:
            db.execute("INSERT OR REPLACE INTO entries (key, url) VALUES (?, ?)", (key, url))
            db.execute("DELETE FROM tags WHERE key = ?", (key,))
            db.executemany("INSERT OR IGNORE INTO tags (tag, key) VALUES (?, ?)",
                           [(t, key) for t in tags])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def remove(self, keys: list[str]) -> None:
        db = self._db()
        db.execute("BEGIN")
        try:
            db.executemany("DELETE FROM entries WHERE key = ?", [(k,) for k in keys])
            db.executemany("DELETE FROM tags WHERE key = ?", [(k,) for k in keys])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def keys_for_url(self, url: str) -> list[str]:
        rows = self._db().execute("SELECT key FROM entries WHERE url = ?", (url,))
        return [r[0] for r in rows]

    def keys_for_prefix(self, prefix: str) -> list[str]:
        # A range scan on the url index: every url >= prefix and < prefix with its last char + 1.
        upper = prefix[:-1] + chr(ord(prefix[-1]) + 1) if prefix else "\U0010ffff"
        rows = self._db().execute(
            "SELECT key FROM entries WHERE url >= ? AND url < ?", (prefix, upper)
        )
        return [r[0] for r in rows]

    def keys_for_tag(self, tag: str) -> list[str]:
        return [r[0] for r in self._db().execute("SELECT key FROM tags WHERE tag = ?", (tag,))]

    def clear(self) -> None:
        db = self._db()
        db.execute("DELETE FROM entries")
        db.execute("DELETE FROM tags")

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
