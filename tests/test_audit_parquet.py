"""An audit store exported as Parquet reads back, with pyarrow, to the store's own rows: every map,
logit vector and curve repacked to the store's .npy bytes, every key column and score equal; the
export never writes over the store and leaves no temporary file.

Reference: the SQLite store itself (read with sqlite3, not through AuditStore).
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import engine
from engine.audit import AuditStore, Plan, audit
from engine.audit.store import pack
from engine.errors import OverwriteError
from engine.images import expand_paths
from tests.untrusted_models import linear_model, save, weights

pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is not installed (pip install 'onnxplain[ray]')")
from engine.audit.parquet import FILES, IMAGES_FILE, write_parquet  # noqa: E402

COLUMNS = "key, model_sha256, image_sha256, kind, name, params, source, target, score, data, record, seconds"


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parquet")
    w, b = weights()
    model = save(linear_model(w, b, labels=["cat", "dog", "fish"]), tmp / "m.onnx")
    photos = tmp / "photos"
    photos.mkdir()
    rng = np.random.default_rng(2)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (6, 5, 3), np.uint8)).save(photos / f"p{i}.png")
    plan = Plan(
        methods=[("saliency", {}), ("gradient_x_input", {})],
        metrics=[("completeness", {}), ("insertion", {})],
        output="logit",
        chunk=2,
    )
    with AuditStore(tmp / "out" / "audit.sqlite") as store:
        audit(engine.load(model), expand_paths([photos]), store, plan)
    return tmp / "out" / "audit.sqlite"


def _stored(db: Path) -> dict[str, tuple]:
    con = sqlite3.connect(db)
    try:
        return {r[0]: r for r in con.execute(f"SELECT {COLUMNS} FROM results").fetchall()}
    finally:
        con.close()


@pytest.mark.parametrize("rows_per_group", [256, 3])  # one row group, and groups cut mid-kind
def test_parquet_round_trips_to_the_stores_bytes(store_path, tmp_path, rows_per_group):
    with AuditStore(store_path, create=False) as store:
        counts = write_parquet(store, tmp_path / "pq", rows_per_group=rows_per_group)
    want = _stored(store_path)
    kinds = {"prediction": 5, "method": 10, "metric": 20}
    assert counts == {**{FILES[k]: n for k, n in kinds.items()}, IMAGES_FILE: 5}
    seen = set()
    for kind, name in FILES.items():
        path = tmp_path / "pq" / name
        if rows_per_group == 3:
            assert pq.ParquetFile(path).num_row_groups == -(-kinds[kind] // 3)
        for row in pq.read_table(path).to_pylist():
            key, model, image, k, nm, params, source, target, score, blob, record, seconds = want[row["key"]]
            assert (row["model_sha256"], row["image_sha256"], row["kind"], row["name"]) == (
                model,
                image,
                k,
                nm,
            )
            assert (row["source"], row["target"], row["score"], row["seconds"]) == (
                source,
                target,
                score,
                seconds,
            )
            assert json.loads(row["params"]) == json.loads(params)
            assert json.loads(row["record"]) == json.loads(record)
            if blob is None:
                assert row["data"] is None and row["shape"] is None
            else:
                dtype = np.float64 if kind == "metric" else np.float32
                got = np.asarray(row["data"], dtype).reshape(row["shape"])
                assert pack(got) == blob  # bit for bit the stored array, its shape and dtype
            seen.add(key)
    assert seen == set(want)  # every result once
    assert any(want[k][9] is not None for k in want if want[k][3] == "metric")  # curves were compared
    images = pq.read_table(tmp_path / "pq" / IMAGES_FILE).to_pylist()
    con = sqlite3.connect(store_path)
    stored = con.execute("SELECT sha256, path, position, record FROM images ORDER BY position").fetchall()
    con.close()
    assert [(i["sha256"], i["path"], i["position"], json.loads(i["record"])) for i in images] == [
        (s, p, n, json.loads(r)) for s, p, n, r in stored
    ]
    assert sorted(os.listdir(tmp_path / "pq")) == sorted([*FILES.values(), IMAGES_FILE])  # no temporaries


def test_the_export_never_writes_over_the_store(store_path, tmp_path):
    out = tmp_path / "pq"
    out.mkdir()
    (out / "maps.parquet").symlink_to(store_path)
    before = store_path.read_bytes()
    with AuditStore(store_path, create=False) as store:
        with pytest.raises(OverwriteError, match="refusing to overwrite"):
            write_parquet(store, out)
    assert store_path.read_bytes() == before
    assert os.listdir(out) == ["maps.parquet"]


def test_cli_audit_export(store_path, tmp_path, capsys):
    from engine.cli import main

    assert main(["audit-export", str(store_path.parent), str(tmp_path / "pq"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["rows"]["maps.parquet"] == 10
    assert pq.read_table(tmp_path / "pq" / "maps.parquet").num_rows == 10
    assert main(["audit-export", str(tmp_path / "nothing.sqlite"), str(tmp_path / "pq2")]) == 1
    assert "no such audit database" in capsys.readouterr().err
