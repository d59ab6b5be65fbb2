"""An audit store as Parquet files, for analysis with pandas, DuckDB, Spark or Ray Data.

One file per kind of result, one row per result, in the store's order:

- ``predictions.parquet``: each image's logits (``data``, float32, ``shape`` [classes]);
- ``maps.parquet``: each method's map (``data``, float32, flattened in C order; ``shape`` the
  map's own, e.g. [3, 224, 224]);
- ``metrics.parquet``: each metric's ``score`` and its curve where it has one (``data``,
  float64; null otherwise); ``source`` is the key of the map it scored;
- ``images.parquet``: each image of the audit (sha256, model, path, position, decoding record).

Every result row has the store's columns: ``key``, ``model_sha256``, ``image_sha256``, ``kind``,
``name``, ``params`` and ``record`` (JSON text), ``source``, ``target``, ``score``, ``seconds``.
A map reads back as ``np.asarray(row["data"], np.float32).reshape(row["shape"])``, bit for bit the
array in the store. Maps are a variable-length list column rather than a fixed-size one because
methods of one audit may give maps of different shapes.

Each file is written to a temporary name in the output folder and renamed when complete, from
one read transaction (a consistent snapshot even while an audit is writing the store), streamed
in row groups so memory stays flat however large the store.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from ..atomic import TEMP_SUFFIX, refuse_overwrite
from ..errors import InputError
from .store import AuditStore

FILES = {"prediction": "predictions.parquet", "method": "maps.parquet", "metric": "metrics.parquet"}
IMAGES_FILE = "images.parquet"
MAX_GROUP_VALUES = 1 << 26  # 256 MiB of float32 per row group at most
_DTYPES = {"prediction": np.float32, "method": np.float32, "metric": np.float64}


def _schema(kind: str):
    import pyarrow as pa

    return pa.schema(
        [
            ("key", pa.string()),
            ("model_sha256", pa.string()),
            ("image_sha256", pa.string()),
            ("kind", pa.string()),
            ("name", pa.string()),
            ("params", pa.string()),
            ("source", pa.string()),
            ("target", pa.int64()),
            ("score", pa.float64()),
            ("data", pa.list_(pa.from_numpy_dtype(_DTYPES[kind]))),
            ("shape", pa.list_(pa.int64())),
            ("seconds", pa.float64()),
            ("record", pa.string()),
        ]
    )


def write_parquet(
    store: AuditStore, out_dir: str | os.PathLike, *, rows_per_group: int = 256
) -> dict[str, int]:
    """Write the results and images of ``store`` as Parquet files into the folder ``out_dir``
    (created if needed; files of an earlier export are replaced, the store never).
    ``rows_per_group``: rows held in memory and written per Parquet row group.
    Returns the number of rows written per file name."""
    import pyarrow.parquet as pq

    if isinstance(rows_per_group, bool) or not isinstance(rows_per_group, int) or rows_per_group < 1:
        raise InputError(f"rows_per_group must be a positive integer, got {rows_per_group!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: the Parquet output must be a folder")
    for name in [*FILES.values(), IMAGES_FILE]:
        refuse_overwrite(out / name, [store.path], "the Parquet output")
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, int] = {}
    store.db.execute("BEGIN")  # one snapshot for every file (WAL: the audit may keep writing)
    try:
        for kind, name in FILES.items():
            schema = _schema(kind)
            with _atomic(out / name) as tmp, pq.ParquetWriter(tmp, schema) as writer:
                written[name] = 0
                group: list = []
                values = 0
                for row in store.results(kind):
                    group.append(row)
                    values += 0 if row.data is None else row.data.size
                    # a row group's list offsets are 32-bit: flush long before they could overflow
                    if len(group) == rows_per_group or values >= MAX_GROUP_VALUES:
                        writer.write_table(_table(group, kind, schema))
                        written[name] += len(group)
                        group, values = [], 0
                if group or not written[name]:  # an empty kind still gets its file and schema
                    writer.write_table(_table(group, kind, schema))
                    written[name] += len(group)
        written[IMAGES_FILE] = _write_images(store, out / IMAGES_FILE)
    finally:
        store.db.execute("COMMIT")
    return written


def _table(rows: list, kind: str, schema):
    import pyarrow as pa

    dtype = _DTYPES[kind]
    values, offsets, shapes, valid = [], [0], [], []
    for r in rows:
        if r.data is None:
            offsets.append(offsets[-1])
            shapes.append(None)
            valid.append(False)
            continue
        a = np.asarray(r.data)
        if not np.can_cast(a.dtype, dtype, "safe"):
            raise InputError(f"result {r.key}: {a.dtype} data does not fit the {np.dtype(dtype)} column")
        values.append(np.ascontiguousarray(a, dtype).ravel())
        offsets.append(offsets[-1] + a.size)
        shapes.append(list(a.shape))
        valid.append(True)
    flat = np.concatenate(values) if values else np.zeros(0, dtype)
    mask = pa.array([not v for v in valid], pa.bool_())
    data = pa.ListArray.from_arrays(pa.array(np.asarray(offsets, np.int32)), pa.array(flat), mask=mask)
    columns = {
        "key": [r.key for r in rows],
        "model_sha256": [r.model_sha256 for r in rows],
        "image_sha256": [r.image_sha256 for r in rows],
        "kind": [r.kind for r in rows],
        "name": [r.name for r in rows],
        "params": [json.dumps(r.params, sort_keys=True) for r in rows],
        "source": [r.source for r in rows],
        "target": [r.target for r in rows],
        "score": [r.score for r in rows],
        "data": data,
        "shape": shapes,
        "seconds": [r.seconds for r in rows],
        "record": [json.dumps(r.record, sort_keys=True) for r in rows],
    }
    return pa.Table.from_pydict(columns, schema=schema)


def _write_images(store: AuditStore, path: Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("sha256", pa.string()),
            ("model_sha256", pa.string()),
            ("path", pa.string()),
            ("position", pa.int64()),
            ("record", pa.string()),
        ]
    )
    images = store.images()  # one row per image and model: small (the pictures are left out)
    table = pa.Table.from_pydict(
        {
            "sha256": [i["sha256"] for i in images],
            "model_sha256": [i["model_sha256"] for i in images],
            "path": [i["path"] for i in images],
            "position": [i["position"] for i in images],
            "record": [json.dumps(i["record"], sort_keys=True) for i in images],
        },
        schema=schema,
    )
    with _atomic(path) as tmp:
        pq.write_table(table, tmp)
    return len(images)


class _atomic:
    """A temporary file beside ``path``, renamed over it when the block ends without an error
    (with the mode a plain open would give it), removed otherwise."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> str:
        fd, self.tmp = tempfile.mkstemp(
            prefix=f".{self.path.name}.", suffix=TEMP_SUFFIX, dir=self.path.parent
        )
        os.close(fd)
        return self.tmp

    def __exit__(self, kind, e, tb) -> None:
        if kind is not None:
            Path(self.tmp).unlink(missing_ok=True)
            return
        try:
            with open(self.tmp, "rb") as f:
                os.fsync(f.fileno())
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(self.tmp, 0o666 & ~mask)
            os.replace(self.tmp, self.path)
        except BaseException:
            Path(self.tmp).unlink(missing_ok=True)
            raise
