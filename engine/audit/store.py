"""The audit store: one SQLite database per audit, written one result at a time.

Every result (a model's logits for an image, a method's map, a metric's score) is one row in one
transaction, keyed by the digest of what determines it: the model's sha256, the image's sha256,
the kind and name, every parameter (defaults included), the target rule and the chunk of images
it was computed with (methods that draw noise draw it per batch, so the chunk is part of the
definition). WAL journal with ``synchronous=NORMAL``: a commit is in the operating system's hands
when it returns, so a process killed with SIGKILL at any moment loses at most the row it was
writing, and a restarted audit skips every key already present: nothing is lost and nothing is
duplicated (``INSERT OR IGNORE`` on the primary key). NORMAL skips the fsync per commit (measured
22–28 ms per row here, the limit of a Ray audit's driver); a power cut may roll back the last
commits — never corrupt the database — and the rerun recomputes them.

Arrays are stored as ``.npy`` bytes, bit for bit.
"""

from __future__ import annotations

import hashlib
import io
import json
import sqlite3
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS models (
    sha256 TEXT PRIMARY KEY, path TEXT, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    sha256 TEXT NOT NULL, model_sha256 TEXT NOT NULL, path TEXT, position INTEGER,
    picture BLOB, record TEXT NOT NULL, PRIMARY KEY (sha256, model_sha256));
CREATE TABLE IF NOT EXISTS results (
    key TEXT PRIMARY KEY, model_sha256 TEXT NOT NULL, image_sha256 TEXT NOT NULL,
    kind TEXT NOT NULL, name TEXT NOT NULL, params TEXT NOT NULL, source TEXT,
    target INTEGER, score REAL, data BLOB, record TEXT NOT NULL, seconds REAL, created REAL);
CREATE INDEX IF NOT EXISTS results_by_image ON results (image_sha256, kind, name);
"""


def result_key(**parts: Any) -> str:
    """The digest that identifies a result: canonical JSON of its defining parts."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def pack(a: np.ndarray) -> bytes:
    """``.npy`` bytes, uncompressed: float maps barely compress (7 % with zlib) and zlib costs
    26 ms per 224×224×3 map, most of a row's commit."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def unpack(blob: bytes) -> np.ndarray:
    if not blob.startswith(b"\x93NUMPY"):  # zlib-compressed, as the first audits stored them
        blob = zlib.decompress(blob)
    return np.load(io.BytesIO(blob), allow_pickle=False)


@dataclass
class Row:
    """One stored result."""

    key: str
    model_sha256: str
    image_sha256: str
    kind: str  # "prediction", "method", "metric"
    name: str
    params: dict
    source: str | None  # the key of the result this one was computed from (a metric's map)
    target: int | None
    score: float | None
    data: np.ndarray | None
    record: dict
    seconds: float | None


class AuditStore:
    """An audit database. ``AuditStore(path)`` opens (or creates) it; use as a context manager."""

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise InputError(f"{self.path}: no such audit database")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(_SCHEMA)
            version = self.meta("schema_version")
        except sqlite3.DatabaseError as e:
            raise InputError(f"{self.path}: not an onnxplain audit database ({e})") from None
        if version is None:
            self.set_meta("schema_version", str(SCHEMA_VERSION))
        elif version != str(SCHEMA_VERSION):
            raise InputError(f"{self.path}: audit schema {version}, this onnxplain reads {SCHEMA_VERSION}")

    def __enter__(self) -> AuditStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.db.close()

    # -- small tables ---------------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def add_model(self, sha256: str, path: str, record: dict) -> None:
        self.db.execute("INSERT OR IGNORE INTO models VALUES (?, ?, ?)", (sha256, path, json.dumps(record)))

    def models(self) -> list[dict]:
        rows = self.db.execute("SELECT sha256, path, record FROM models ORDER BY rowid").fetchall()
        return [{"sha256": s, "path": p, **json.loads(r)} for s, p, r in rows]

    def add_image(
        self, sha256: str, model_sha256: str, path: str, position: int, picture: bytes, record: dict
    ) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO images VALUES (?, ?, ?, ?, ?, ?)",
            (sha256, model_sha256, path, position, picture, json.dumps(record)),
        )

    def images(self, model_sha256: str | None = None) -> list[dict]:
        sql = "SELECT sha256, model_sha256, path, position, picture, record FROM images"
        args: tuple = ()
        if model_sha256:
            sql, args = sql + " WHERE model_sha256 = ?", (model_sha256,)
        rows = self.db.execute(sql + " ORDER BY position, rowid", args).fetchall()
        return [
            {
                "sha256": s,
                "model_sha256": m,
                "path": p,
                "position": i,
                "picture": pic,
                "record": json.loads(r),
            }
            for s, m, p, i, pic, r in rows
        ]

    # -- results --------------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return self.db.execute("SELECT 1 FROM results WHERE key = ?", (key,)).fetchone() is not None

    def missing(self, keys: list[str]) -> list[str]:
        return [k for k in keys if not self.has(k)]

    def put(self, row: Row) -> bool:
        """Store one result in its own transaction; False when the key was already there."""
        cur = self.db.execute(
            "INSERT OR IGNORE INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.key,
                row.model_sha256,
                row.image_sha256,
                row.kind,
                row.name,
                json.dumps(row.params, sort_keys=True),
                row.source,
                row.target,
                row.score,
                None if row.data is None else pack(row.data),
                json.dumps(row.record, sort_keys=True),
                row.seconds,
                time.time(),
            ),
        )
        return cur.rowcount == 1

    def get(self, key: str) -> Row | None:
        rows = list(self._select("WHERE key = ?", (key,)))
        return rows[0] if rows else None

    def results(self, kind: str | None = None, *, with_data: bool = True) -> Iterator[Row]:
        if kind is None:
            return self._select("ORDER BY rowid", (), with_data)
        return self._select("WHERE kind = ? ORDER BY rowid", (kind,), with_data)

    def count(self, kind: str | None = None) -> int:
        if kind is None:
            return self.db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
        return self.db.execute("SELECT COUNT(*) FROM results WHERE kind = ?", (kind,)).fetchone()[0]

    def _select(self, where: str, args: tuple, with_data: bool = True) -> Iterator[Row]:
        data = "data" if with_data else "NULL"
        sql = (
            "SELECT key, model_sha256, image_sha256, kind, name, params, source, target, score, "
            f"{data}, record, seconds FROM results {where}"
        )
        for k, m, i, kind, name, params, src, t, score, blob, record, secs in self.db.execute(sql, args):
            yield Row(
                k,
                m,
                i,
                kind,
                name,
                json.loads(params),
                src,
                t,
                score,
                None if blob is None else unpack(blob),
                json.loads(record),
                secs,
            )
