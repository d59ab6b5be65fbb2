"""The audit over a local Ray cluster on 127.0.0.1: the same store as the one-machine audit, row
for row and bit for bit, with a worker SIGKILLed mid-run and with the driver SIGKILLed and rerun;
nothing of the cluster listens outside loopback.

References: engine.audit.audit (one process) on the same plan, chunks and images; `ss -ltnp` for
the cluster's listening sockets.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

import engine
from engine.audit import AuditStore, Plan, audit
from engine.errors import InputError
from engine.images import expand_paths
from tests.untrusted_models import linear_model, save, weights

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'onnxplain[ray]')")
from engine.audit.ray_backend import audit_on_ray, start_local, stop_local  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = ("127.0.0.1:", "[::ffff:127.0.0.1]:")
SLOW_PLAN = {"methods": [("saliency", {}), ("smoothgrad", {"samples": 400})], "chunk": 1}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ray")
    w, b = weights()
    model = save(linear_model(w, b, labels=["cat", "dog", "fish"]), tmp / "m.onnx")
    photos = tmp / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(7):
        Image.fromarray(rng.integers(0, 256, (6, 5, 3), np.uint8)).save(photos / f"p{i}.png")
    clf = engine.load(model)  # compiles once: the workers and subprocesses find it in the cache
    refs = {}
    for name, plan in (
        ("small", Plan(methods=[("saliency", {}), ("smoothgrad", {"samples": 3, "seed": 5})], chunk=3)),
        ("slow", Plan(**SLOW_PLAN)),
    ):
        with AuditStore(tmp / f"ref-{name}.sqlite") as store:
            audit(clf, expand_paths([photos]), store, plan)
        refs[name] = _rows(tmp / f"ref-{name}.sqlite")
    return model, photos, refs


def _rows(db: Path) -> dict[str, tuple]:
    con = sqlite3.connect(db)
    try:
        rows = con.execute("SELECT key, kind, name, target, score, data FROM results").fetchall()
    finally:
        con.close()
    return {r[0]: r[1:] for r in rows}


def _descendants(root: int) -> set[int]:
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parent[int(d.name)] = int(fields[1])
    out, grew = {root}, True
    while grew:
        more = {p for p, pp in parent.items() if pp in out} - out
        grew = bool(more)
        out |= more
    return out - {root}


def _listeners(pids: set[int]) -> list[tuple[str, int]]:
    """(local address, pid) of every TCP listener owned by one of ``pids`` (`ss -ltnp`)."""
    text = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True, timeout=30).stdout
    out = []
    for line in text.splitlines():
        cols = line.split()
        for pid in map(int, re.findall(r"pid=(\d+)", line)):
            if pid in pids:
                out.append((cols[3], pid))
    return out


class TestOnOneCluster:
    @pytest.fixture(scope="class")
    def cluster(self):
        start_local(num_cpus=2)
        yield
        stop_local()

    def test_same_store_as_the_one_machine_audit_and_only_loopback_listeners(self, data, cluster, tmp_path):
        model, photos, refs = data
        plan = Plan(methods=[("saliency", {}), ("smoothgrad", {"samples": 3, "seed": 5})], chunk=3)
        seen: dict = {}

        def on_workers(pool):
            seen["pids"] = ray.get([a.pid.remote() for a in pool], timeout=60)
            seen["listeners"] = _listeners(_descendants(os.getpid()))

        with AuditStore(tmp_path / "a.sqlite") as store:
            s = audit_on_ray(model, expand_paths([photos]), store, plan, workers=2, on_workers=on_workers)
        assert (s.images, s.chunks, s.computed, s.skipped) == (7, 3, 21, 0)
        assert _rows(tmp_path / "a.sqlite") == refs["small"]  # same keys, same bytes
        assert len(set(seen["pids"])) == 2 and os.getpid() not in seen["pids"]
        listeners = seen["listeners"]
        assert len({pid for _, pid in listeners}) >= 2  # at least the GCS and the raylet
        outside = [(a, p) for a, p in listeners if not a.startswith(LOOPBACK)]
        assert not outside, f"Ray listens outside loopback: {outside}"
        # Rerun: everything is there, nothing is computed and no actor is started.
        with AuditStore(tmp_path / "a.sqlite") as store:
            s2 = audit_on_ray(model, expand_paths([photos]), store, plan, on_workers=pytest.fail)
        assert (s2.computed, s2.skipped) == (0, 21)

    def test_excitation_backprop_ships_its_own_graph(self, data, cluster, tmp_path):
        model, photos, _ = data
        plan = Plan(methods=[("excitation_backprop", {"layer": "input", "contrastive": False})], chunk=4)
        with AuditStore(tmp_path / "ref.sqlite") as store:
            audit(engine.load(model), expand_paths([photos]), store, plan)
        with AuditStore(tmp_path / "a.sqlite") as store:
            s = audit_on_ray(model, expand_paths([photos]), store, plan, workers=1)
        assert s.computed == 14  # 7 predictions + 7 maps
        assert _rows(tmp_path / "a.sqlite") == _rows(tmp_path / "ref.sqlite")
        # the driver ships the excitation graph (workers need no builder), not only the gradient's
        from engine.audit.ray_backend import _gradient_models
        from engine.compile import CompiledInfo

        shipped = [
            CompiledInfo.from_model(onnx.load_from_string(b))
            for b in _gradient_models(engine.load(model), plan)
        ]
        assert [(i.rule, i.layer) for i in shipped] == [("excitation", None)]

    def test_a_worker_sigkilled_mid_run_has_its_units_retried(self, data, cluster, tmp_path):
        model, photos, refs = data
        state: dict = {}

        def on_workers(pool):
            state["pool"] = pool
            state["pids"] = ray.get([a.pid.remote() for a in pool], timeout=60)

        def progress(step, done, total):
            if step == "units" and done == 1:
                os.kill(state["pids"][0], signal.SIGKILL)  # it has units queued or running
                state["total"] = total

        with AuditStore(tmp_path / "k.sqlite") as store:
            s = audit_on_ray(
                model,
                expand_paths([photos]),
                store,
                Plan(**SLOW_PLAN),
                workers=2,
                progress=progress,
                on_workers=on_workers,
            )
            restarted = ray.get(state["pool"][0].pid.remote(), timeout=60)
        assert state["total"] == 14 and restarted != state["pids"][0]  # it died and came back
        assert (s.computed, s.skipped) == (21, 0)
        assert _rows(tmp_path / "k.sqlite") == refs["slow"]  # nothing lost, nothing duplicated
        # The cluster has run a while now (its agents are up): still nothing outside loopback.
        listeners = _listeners(_descendants(os.getpid()))
        assert listeners and all(a.startswith(LOOPBACK) for a, _ in listeners), listeners

    def test_a_model_with_external_weights_ships_inline_under_its_digest(self, data, cluster, tmp_path):
        _, photos, _ = data
        w, b = weights()
        w[:, 2] *= -2.0  # another model than the module's
        model = save(linear_model(w, b, w_location="weights.bin"), tmp_path / "m.onnx")
        (tmp_path / "weights.bin").write_bytes(w.tobytes())
        clf = engine.load(model)
        plan = Plan(methods=[("gradient_x_input", {})], chunk=4)
        with AuditStore(tmp_path / "ref.sqlite") as store:
            audit(clf, expand_paths([photos]), store, plan)
        with AuditStore(tmp_path / "ray.sqlite") as store:
            s = audit_on_ray(clf, expand_paths([photos]), store, plan, workers=1)
            assert [m["sha256"] for m in store.models()] == [clf.sha256]
        assert s.computed == 14 and _rows(tmp_path / "ray.sqlite") == _rows(tmp_path / "ref.sqlite")

    def test_metrics_added_later_score_the_stored_maps_shipped_to_the_workers(self, data, cluster, tmp_path):
        model, photos, _ = data
        paths = expand_paths([photos])
        methods = [("gradient_x_input", {}), ("saliency", {})]
        metrics = [("completeness", {}), ("max_sensitivity", {"samples": 2})]
        full = Plan(methods=methods, metrics=metrics, output="logit", chunk=4)
        with AuditStore(tmp_path / "ref.sqlite") as store:
            audit(engine.load(model), paths, store, full)
        with AuditStore(tmp_path / "ray.sqlite") as store:
            first = audit_on_ray(model, paths, store, Plan(methods=methods, output="logit", chunk=4))
            # the maps are stored: the second run's units are metrics only, the maps go with them
            second = audit_on_ray(model, paths, store, full)
        assert (first.computed, second.computed, second.skipped) == (21, 28, 21)
        assert _rows(tmp_path / "ray.sqlite") == _rows(tmp_path / "ref.sqlite")

    def test_an_error_in_a_unit_is_raised_on_the_driver_as_itself(self, data, cluster, tmp_path):
        model, photos, _ = data
        plan = Plan(methods=[("integrated_gradients", {"steps": -3})])  # refused by the method itself
        with AuditStore(tmp_path / "e.sqlite") as store:
            with pytest.raises(InputError, match="steps must be a positive integer, got -3"):
                audit_on_ray(model, expand_paths([photos]), store, plan, workers=1)
            assert store.count("method") == 0
            # more actors than the cluster's CPUs hold: refused at once (Ray would wait silently)
            with pytest.raises(InputError, match="workers=5 × 0.5 CPU each do not fit"):
                audit_on_ray(model, expand_paths([photos]), store, Plan([("saliency", {})]), workers=5)


def _cmd(model, photos, out):
    return [
        sys.executable,
        "-m",
        "engine.cli",
        "audit",
        str(model),
        str(photos),
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
        "2",
        "--json",
    ]


def _session_pids(sid: int) -> set[int]:
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getsid(int(d.name)) == sid:
                    out.add(int(d.name))
            except OSError:
                pass
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def test_the_driver_sigkilled_then_rerun_resumes_to_the_same_store(data, tmp_path):
    model, photos, refs = data
    assert not ray.is_initialized()
    want = refs["slow"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT)
    out = tmp_path / "out"
    db = out / "audit.sqlite"
    proc = subprocess.Popen(_cmd(model, photos, out), env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                n = len(_rows(db)) if db.exists() else 0
            except sqlite3.OperationalError:  # schema not created yet
                n = 0
            if n >= 6:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        # The cluster the driver started shares its fate (Ray ties its processes to the driver's
        # life). Ray's dashboard and runtime-env agents, when still starting up, can outlive it: once
        # the rest is gone (at most 30 s), whatever of the driver's session is left is ended here, by pid.
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
        _cmd(model, photos, out), env=env, check=True, timeout=300, capture_output=True, text=True
    )
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["skipped"] == len(got) and summary["computed"] == len(want) - len(got)
    assert _rows(db) == want


def test_cli_ray_options_are_checked_before_anything_runs(data, tmp_path, capsys):
    from engine.cli import main

    model, photos, _ = data
    base = ["audit", str(model), str(photos), "--out", str(tmp_path / "o")]
    assert main([*base, "--workers", "2"]) == 2
    assert "--workers needs --ray" in capsys.readouterr().err
    assert main([*base, "--ray", "--workers", "0"]) == 2
    assert "--workers must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
