"""The audit with its images from Ray Data, on a local cluster on 127.0.0.1: the store equals the
folder audit's row for row (results and images tables, same bytes), a corrupt file fails with the
folder audit's own message, a driver SIGKILLed mid-run resumes to the same store, and nothing of
the cluster (Ray Data's read tasks included) listens outside loopback.

References: engine.audit.audit over the same files as a folder (its decoder reads the files
itself); `ss -ltnp` for the listening sockets. The photos include a 16-bit PNG and a JPEG with an
EXIF orientation, which only engine.images' decoder reads the way the folder audit does.
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
from engine.errors import ImageError, InputError
from engine.images import expand_paths
from tests.untrusted_models import linear_model, save, weights

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'onnxplain[ray]')")
pytest.importorskip("pyarrow", reason="Ray Data needs pyarrow (pip install 'onnxplain[ray]')")
pytest.importorskip("pandas", reason="Ray Data needs pandas (pip install 'onnxplain[ray]')")
pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'onnxplain[ray]')")

from engine.audit.ray_backend import audit_on_ray, start_local, stop_local  # noqa: E402
from tests.test_audit_ray import LOOPBACK, _cmdline, _descendants, _listeners, _session_pids  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
PLAN = {"methods": [("saliency", {}), ("smoothgrad", {"samples": 3, "seed": 5})], "chunk": 3}
SLOW_PLAN = {"methods": [("saliency", {}), ("smoothgrad", {"samples": 400})], "chunk": 1}


def _photos(folder: Path) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (6, 5, 3), np.uint8)).save(folder / f"p{i}.png")
    # 16 bits: scaled by 65,535 by our decoder (Pillow's own conversion clips to 8 bits)
    Image.fromarray(rng.integers(0, 65536, (9, 7), np.uint16)).save(folder / "deep.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90°: applied by our decoder before the crop
    Image.fromarray(rng.integers(0, 256, (5, 8, 3), np.uint8)).save(folder / "turned.jpg", exif=exif)
    return folder


def _tables(db: Path) -> tuple[dict, dict]:
    """Every column of results (but the commit time) and of images, by key."""
    con = sqlite3.connect(db)
    try:
        results = con.execute(
            "SELECT key, model_sha256, image_sha256, kind, name, params, source, target, score, data, "
            "record FROM results"
        ).fetchall()
        images = con.execute(
            "SELECT sha256, model_sha256, path, position, picture, record FROM images"
        ).fetchall()
    finally:
        con.close()
    return {r[0]: r[1:] for r in results}, {(r[0], r[1]): r[2:] for r in images}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("raydata")
    w, b = weights()
    model = save(linear_model(w, b, labels=["cat", "dog", "fish"]), tmp / "m.onnx")
    photos = _photos(tmp / "photos")
    clf = engine.load(model)  # compiles once: the workers and subprocesses find it in the cache
    refs = {}
    for name, plan in (("small", Plan(**PLAN)), ("slow", Plan(**SLOW_PLAN))):
        with AuditStore(tmp / f"ref-{name}.sqlite") as store:
            audit(clf, expand_paths([photos]), store, plan)
        refs[name] = tmp / f"ref-{name}.sqlite"
    return model, photos, refs


class TestOnOneCluster:
    @pytest.fixture(scope="class")
    def cluster(self):
        start_local(num_cpus=2)
        yield
        stop_local()

    def test_same_store_as_the_folder_audit_and_only_loopback_listeners(self, data, cluster, tmp_path):
        model, photos, refs = data
        seen: dict = {}

        def on_workers(pool):
            seen["pids"] = ray.get([a.pid.remote() for a in pool], timeout=60)

        with AuditStore(tmp_path / "a.sqlite") as store:
            s = audit_on_ray(model, None, store, Plan(**PLAN), dataset=str(photos), on_workers=on_workers)
            # Ray Data's read tasks have run in the cluster's workers: still nothing outside loopback
            listeners = _listeners(_descendants(os.getpid()))
        assert (s.images, s.chunks, s.computed, s.skipped) == (7, 3, 21, 0)
        results, images = _tables(tmp_path / "a.sqlite")
        want_results, want_images = _tables(refs["small"])
        assert results == want_results  # same keys, same bytes, same records
        assert images == want_images  # same paths, positions, pictures and decoding records
        assert len(set(seen["pids"])) == 2 and os.getpid() not in seen["pids"]
        assert len({pid for _, pid in listeners}) >= 2  # at least the GCS and the raylet
        outside = [(a, p) for a, p in listeners if not a.startswith(LOOPBACK)]
        assert not outside, f"Ray listens outside loopback: {outside}"
        # A Dataset made by the caller (as read_binary_files makes it) and a file list: all done,
        # and found so before any actor is started
        ds = ray.data.read_binary_files(str(photos), include_paths=True, num_cpus=0.25)
        listed = [str(p) for p in expand_paths([photos])]
        with AuditStore(tmp_path / "a.sqlite") as store:
            again = audit_on_ray(model, None, store, Plan(**PLAN), dataset=ds, on_workers=pytest.fail)
            third = audit_on_ray(model, None, store, Plan(**PLAN), dataset=listed, on_workers=pytest.fail)
        assert (again.images, again.computed, again.skipped) == (7, 0, 21)
        assert (third.images, third.computed, third.skipped) == (7, 0, 21)

    @pytest.mark.parametrize("damage", ["not an image", "truncated"])
    def test_a_corrupt_file_fails_with_the_folder_audits_message(self, data, cluster, tmp_path, damage):
        model, photos, _ = data
        folder = tmp_path / "photos"
        folder.mkdir()
        for p in sorted(photos.iterdir()):
            (folder / p.name).write_bytes(p.read_bytes())
        good = (folder / "p1.png").read_bytes()
        bad = b"\x89PNG not really" * 4 if damage == "not an image" else good[: len(good) // 2]
        (folder / "p2.png").write_bytes(bad)
        plan = Plan(methods=[("saliency", {})], chunk=2)
        with AuditStore(tmp_path / "ref.sqlite") as store:
            with pytest.raises(ImageError) as want:
                audit(engine.load(model), expand_paths([folder]), store, plan)
        with AuditStore(tmp_path / "ray.sqlite") as store:
            with pytest.raises(ImageError) as got:
                audit_on_ray(model, None, store, plan, dataset=str(folder), workers=2)
        assert str(got.value) == str(want.value)
        assert str(folder / "p2.png") in str(got.value)
        # what was committed is exact, and nothing of the failed chunk is there
        ref, _ = _tables(tmp_path / "ref.sqlite")
        ray_rows, _ = _tables(tmp_path / "ray.sqlite")
        assert all(ray_rows[k] == ref[k] for k in ray_rows.keys() & ref.keys())
        import hashlib

        bad_sha = hashlib.sha256(bad).hexdigest()
        assert not any(r[1] == bad_sha for r in ray_rows.values())

    def test_refusals(self, data, cluster, tmp_path):
        model, photos, _ = data
        plan = Plan(methods=[("saliency", {})])
        with AuditStore(tmp_path / "e.sqlite") as store:
            # a read_images-style dataset: decoded by Pillow with no limits, and not the files' bytes
            ds = ray.data.from_items([{"image": np.zeros((4, 4, 3), np.uint8), "path": "x.png"}])
            with pytest.raises(InputError, match="no 'bytes' column.*read_images"):
                audit_on_ray(model, None, store, plan, dataset=ds, workers=1, unit_timeout_s=60)
            # actors that would leave no CPU for Ray Data's read tasks: refused (it would wait forever)
            with pytest.raises(InputError, match=r"workers=4 × 0.5 CPU each \+ 0.25 for Ray Data reads"):
                audit_on_ray(model, None, store, plan, dataset=str(photos), workers=4)
            with pytest.raises(InputError, match="no file matches this pattern"):
                audit_on_ray(model, None, store, plan, dataset=str(photos / "*.nothing"), workers=1)
            with pytest.raises(InputError, match="either image paths or a dataset"):
                audit_on_ray(model, expand_paths([photos]), store, plan, dataset=str(photos))
            assert store.count() == 0


def _cmd(model, photos, out, *extra):
    return [
        sys.executable,
        "-m",
        "engine.cli",
        "audit",
        str(model),
        str(photos),
        "--ray-data",
        "-m",
        "saliency",
        "-m",
        "smoothgrad",
        "--param",
        "smoothgrad.samples=400",
        "--chunk",
        "1",
        "--out",
        str(out),
        "--ray",
        "--workers",
        "1",  # one actor: fewer processes to start on a loaded machine; test_audit_ray kills with two
        "--json",
        *extra,
    ]


def _rows(db: Path) -> dict:
    try:
        return _tables(db)[0] if db.exists() else {}
    except sqlite3.DatabaseError:  # being created: no schema yet, or not yet a database
        return {}


def test_the_driver_sigkilled_then_rerun_resumes_to_the_folder_audits_store(data, tmp_path):
    model, photos, refs = data
    assert not ray.is_initialized()
    want = _tables(refs["slow"])[0]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT)
    out = tmp_path / "out"
    db = out / "audit.sqlite"
    log = tmp_path / "stderr.txt"
    with open(log, "wb") as err:
        proc = subprocess.Popen(_cmd(model, photos, out), env=env, start_new_session=True, stderr=err)
    left: dict = {}
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if len(_rows(db)) >= 6:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        assert proc.wait(timeout=60) == -signal.SIGKILL, log.read_text()[-3000:]
    finally:
        # as in test_audit_ray: the cluster dies with its driver; agents still starting up may not
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            left = {pid: _cmdline(pid) for pid in _session_pids(proc.pid)}
            if not any("agent" not in c.lower() for c in left.values()):
                break
            time.sleep(0.5)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    core = {p: c for p, c in left.items() if "agent" not in c.lower()}
    assert not core, f"processes of the killed driver's cluster still running: {core}"
    got = _rows(db)
    assert 6 <= len(got) < len(want)  # killed mid-run
    assert all(got[k] == want[k] for k in got)  # every committed row exact
    done = subprocess.run(
        _cmd(model, photos, out, "--parquet", str(tmp_path / "pq")),
        env=env,
        check=True,
        timeout=300,
        capture_output=True,
        text=True,
    )
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (summary["images"], summary["chunks"]) == (7, 7)
    assert summary["skipped"] == len(got) and summary["computed"] == len(want) - len(got)
    assert _rows(db) == want
    import pyarrow.parquet as pq

    maps = pq.read_table(tmp_path / "pq" / "maps.parquet")
    assert sorted(maps.column("key").to_pylist()) == sorted(k for k, r in want.items() if r[2] == "method")


def test_cli_ray_data_options_are_checked_before_anything_runs(data, tmp_path, capsys):
    from engine.cli import main

    model, photos, _ = data
    base = ["audit", str(model), "--out", str(tmp_path / "o")]
    assert main([*base, str(photos), "--ray-data"]) == 2
    assert "--ray-data needs --ray" in capsys.readouterr().err
    assert main([*base, str(photos / "*.nothing"), "--ray", "--ray-data", "--parquet", str(model)]) == 2
    err = capsys.readouterr().err
    assert "--parquet" in err and "refusing to overwrite" in err
    assert not (tmp_path / "o").exists()
