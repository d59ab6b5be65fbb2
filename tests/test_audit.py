"""The audit store: results one at a time in SQLite, SIGKILLed and resumed with nothing lost or
duplicated, a report from the database alone, and two audits of two model versions compared.

References: the hand-built linear classifier (logits x·W + b; gradient × input = x·W[:, k] in
closed form), engine.explain on the same chunk (same bits), and an uninterrupted audit.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import engine
from engine.audit import AuditStore, Plan, audit
from engine.audit.report import compare_stores
from engine.cli import main
from engine.images import expand_paths, read_images
from tests.untrusted_models import linear_model, save, weights

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def setup(tmp_path):
    w, b = weights()
    model = save(linear_model(w, b, labels=["cat", "dog", "fish"]), tmp_path / "m.onnx")
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(7):
        Image.fromarray(rng.integers(0, 256, (6, 5, 3), np.uint8)).save(photos / f"p{i}.png")
    return model, photos, w, b


def _rows(db: Path) -> dict[str, tuple]:
    con = sqlite3.connect(db)
    try:
        rows = con.execute("SELECT key, kind, name, target, score, data FROM results").fetchall()
    finally:
        con.close()
    return {r[0]: r[1:] for r in rows}


def test_audit_stores_each_result_with_the_methods_own_numbers(setup, tmp_path):
    model, photos, w, b = setup
    clf = engine.load(model)
    paths = expand_paths([photos])
    plan = Plan(methods=[("gradient_x_input", {}), ("smoothgrad", {"samples": 3, "seed": 5})], chunk=3)
    with AuditStore(tmp_path / "a.sqlite") as store:
        s = audit(clf, paths, store, plan)
        assert (s.images, s.chunks, s.computed, s.skipped) == (7, 3, 21, 0)
        assert store.count("prediction") == 7 and store.count("method") == 14
        x, _ = read_images(paths, clf.input_shape, clf.layout, clf.input_range)
        logits = x.reshape(7, -1) @ w + b
        rows = {(r.name, r.image_sha256): r for r in store.results()}
        images = store.images()
        assert [im["position"] for im in images] == list(range(7))
        for j, im in enumerate(images):
            pred = rows[("logits", im["sha256"])]
            np.testing.assert_allclose(pred.data, logits[j], rtol=1e-5, atol=1e-5)
            k = int(logits[j].argmax())
            gxi = rows[("gradient_x_input", im["sha256"])]
            assert gxi.target == k and gxi.record["class"] == k
            # The closed form for the probability output: p_k (1 - p_k) ... via softmax Jacobian.
            p = np.exp(logits[j] - logits[j].max())
            p /= p.sum()
            grad = (w[:, k] - w @ p) * p[k]
            np.testing.assert_allclose(gxi.data.ravel(), x[j].ravel() * grad, rtol=1e-4, atol=1e-7)
        # SmoothGrad draws noise per chunk: the stored maps are engine.explain on the same chunk.
        for start in (0, 3, 6):
            chunk = x[start : start + 3]
            want = engine.explain(clf, chunk, "smoothgrad", samples=3, seed=5)
            for j in range(len(chunk)):
                got = rows[("smoothgrad", images[start + j]["sha256"])].data
                assert np.array_equal(got, want[j])
        # A second run computes nothing and changes nothing.
        before = _rows(store.path)
        s2 = audit(clf, paths, store, plan)
        assert (s2.computed, s2.skipped) == (0, 21)
        assert _rows(store.path) == before


def _audit_cmd(model, photos, out, chunk=1):
    return [
        sys.executable,
        "-m",
        "engine.cli",
        "audit",
        str(model),
        str(photos),
        "-m",
        "gradient_x_input",
        "-m",
        "smoothgrad",
        "--param",
        "samples=200000",  # ~0.1 s a chunk: slow enough to be killed between rows, not after all
        "--chunk",
        str(chunk),
        "--out",
        str(out),
        "--quiet",
    ]


@pytest.mark.slow
def test_audit_killed_with_sigkill_resumes_with_nothing_lost_or_duplicated(setup, tmp_path):
    model, photos, _, _ = setup
    engine.load(model)  # compile once: the subprocesses find it in the test cache
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ref = tmp_path / "ref"
    subprocess.run(_audit_cmd(model, photos, ref), env=env, check=True, timeout=300)
    want = _rows(ref / "audit.sqlite")
    assert len(want) == 21
    out = tmp_path / "killed"
    db = out / "audit.sqlite"
    kills = 0
    for threshold in (2, 8, 15):
        proc = subprocess.Popen(_audit_cmd(model, photos, out), env=env)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                n = len(_rows(db)) if db.exists() else 0
            except sqlite3.OperationalError:  # schema not created yet
                n = 0
            if n >= threshold:
                proc.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.002)
        proc.wait(timeout=60)
        got = _rows(db)
        assert len(got) < len(want)  # killed mid-run
        assert all(got[k] == want[k] for k in got)  # every committed row is exact
        con = sqlite3.connect(db)
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        con.close()
    assert kills == 3
    subprocess.run(_audit_cmd(model, photos, out), env=env, check=True, timeout=300)
    assert _rows(db) == want  # same keys, same bits, no duplicates (key is the primary key)


def test_report_from_the_database_alone_and_two_model_versions_compared(setup, tmp_path, capsys):
    model, photos, w, b = setup
    w2 = w.copy()
    w2[:, 0] *= 1.5
    model2 = save(linear_model(w2, b, labels=["cat", "dog", "fish"]), tmp_path / "m2.onnx")
    for m, out in ((model, "v1"), (model2, "v2")):
        args = ["audit", str(m), str(photos), "-m", "saliency", "--output", "logit", "--target", "dog"]
        assert main([*args, "--out", str(tmp_path / out), "--quiet"]) == 0
    capsys.readouterr()
    # The report needs only the database: remove the models and the photos first.
    x, _ = read_images(expand_paths([photos]), (3, 4, 4), "NCHW")
    for p in (model, model2, *photos.iterdir()):
        p.unlink()
    (tmp_path / "v1" / "report.html").unlink()
    assert main(["report", str(tmp_path / "v1")]) == 0
    page = (tmp_path / "v1" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 7
    capsys.readouterr()
    assert main(["report", str(tmp_path / "v1"), "--against", str(tmp_path / "v2"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    za, zb = x.reshape(7, -1) @ w + b, x.reshape(7, -1) @ w2 + b
    agree = result["models_agree"]
    assert agree["max_abs_logit_diff"] == pytest.approx(np.abs(za - zb).max(), rel=1e-5)
    assert agree["top1_agreement"] == pytest.approx(np.mean(za.argmax(1) == zb.argmax(1)))
    # Saliency of the "dog" logit is |W[:, 1]| per pixel, the same for both versions.
    rows = result["methods"]["saliency"]["per_image"]
    assert len(rows) == 7 and all(r["spearman"] == pytest.approx(1.0) for r in rows)
    with AuditStore(tmp_path / "v1" / "audit.sqlite", create=False) as a:
        with AuditStore(tmp_path / "v2" / "audit.sqlite", create=False) as b2:
            assert compare_stores(a, b2)["images"] == 7


def test_bad_audit_inputs_are_clear_errors(setup, tmp_path, capsys):
    model, photos, _, _ = setup
    assert main(["audit", str(model), str(photos), "-m", "nope", "--out", str(tmp_path / "o")]) == 2
    assert "is not a method" in capsys.readouterr().err
    assert main(["audit", str(model), str(photos), "--chunk", "0", "--out", str(tmp_path / "o")]) == 2
    assert "--chunk" in capsys.readouterr().err
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not sqlite" * 100)
    assert main(["report", str(junk)]) == 1
    assert "not an onnxplain audit database" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "none.sqlite")]) == 1
    assert "no such audit database" in capsys.readouterr().err


def test_audit_metrics_score_each_methods_maps_and_rerun_that_method(setup, tmp_path):
    model, photos, w, b = setup
    clf = engine.load(model)
    paths = expand_paths([photos])
    plan = Plan(
        methods=[("gradient_x_input", {}), ("saliency", {})],
        metrics=[("completeness", {}), ("max_sensitivity", {"samples": 2}), ("model_randomisation", {})],
        output="logit",
        chunk=4,
    )
    with AuditStore(tmp_path / "m.sqlite") as store:
        s = audit(clf, paths, store, plan)
        assert s.computed == 7 + 14 + 42
        x, _ = read_images(paths, clf.input_shape, clf.layout, clf.input_range)
        logits = x.reshape(7, -1) @ w + b
        from scipy.stats import spearmanr

        from engine.initializers import find_blocks, initializer_values, redraw

        block = find_blocks(clf.onnx_model)[0]
        w_random = redraw(initializer_values(clf.onnx_model), block, seed=0)["W"]
        by_key = {r.key: r for r in store.results("method", with_data=False)}
        for r in store.results("metric", with_data=False):
            source = by_key[r.source]
            if r.name == "completeness" and source.name == "gradient_x_input":
                # A linear model's gradient × input from the black (zero) baseline is exact:
                # Σ x·W[:, k] = f(x) − f(0), up to float32 rounding of the logits.
                assert r.score <= 1e-5 * np.abs(logits).max()
            if r.name == "max_sensitivity":
                assert r.record["result"]["params"]["method"] == source.name  # its own method re-run
                if source.name == "saliency":  # W[:, k]: the same map for any input
                    assert r.score == pytest.approx(0.0, abs=1e-6)
            if r.name == "model_randomisation":  # the sanity check, on the ONNX weights
                assert r.record["result"]["params"]["method"] == source.name
                if source.name == "saliency":  # the logit's saliency is |W[:, k]|, before and after
                    k = r.target
                    ha = np.abs(w[:, k]).reshape(3, 16).sum(0)
                    hb = np.abs(w_random[:, k]).reshape(3, 16).sum(0)
                    assert r.score == pytest.approx(spearmanr(ha, hb).statistic, abs=1e-9)
