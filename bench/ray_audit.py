"""Audit throughput over a local Ray cluster: images × methods per second with 1 and 2 workers.

EfficientNet-Lite0 at 224×224, a gradient-bound method (SmoothGrad, ``--samples`` noisy copies),
``--images`` photos in chunks of ``--chunk``. In the same run: the one-machine ``audit`` (the peer:
one process, ``--threads`` onnxruntime threads) and ``audit_on_ray`` with 1 and 2 actors of one
thread each on a local cluster on 127.0.0.1. Throughput counts from the moment the actors are up
(their start — loading the model and building its sessions, once per actor — is printed
apart). Target (issue 13): 2 workers ≥ 1.7× 1 worker on 2 cores.

From the measured costs — compute per unit (the stored rows' seconds), Ray's round trip per task
and the driver's commit per row — it prints what a cluster of GPU nodes would do; the GPU
speed-up over one CPU thread is an assumption (``--gpu-speedup``), printed as such.

With ``--ray-data`` it also runs 2 actors on the same files read by Ray Data (bytes shipped, the
actors decode them): the cost of that input path against the driver decoding the files.

    python -m bench.ray_audit [--images 16] [--chunk 2] [--samples 8] [--threads 2] [--ray-data]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import DEFAULT_WORKDIR, efficientnet_onnx, photo_batch, prepare_workdir


def _photos(work: Path, n: int) -> list[Path]:
    from PIL import Image

    folder = work / f"ray_photos_{n}"
    folder.mkdir(exist_ok=True)
    x = photo_batch(n)
    paths = []
    for i, img in enumerate(x):
        # the bundled photos repeat: a small per-image shift makes every file (and digest) distinct
        rgb = (np.clip(img.transpose(1, 2, 0), 0, 1) * 255).round().astype(np.uint8)
        rgb[0, 0] = (i % 256, (i // 256) % 256, 7)
        path = folder / f"p{i:04d}.png"
        if not path.exists():
            Image.fromarray(rgb).save(path)
        paths.append(path)
    return paths


def _unit_seconds(db: Path, chunk: int) -> tuple[float, float]:
    """(median compute seconds of a method unit, of a prediction) from the rows' per-image seconds."""
    from engine.audit import AuditStore

    with AuditStore(db, create=False) as store:
        method = [r.seconds for r in store.results("method", with_data=False)]
        pred = [r.seconds for r in store.results("prediction", with_data=False)]
    return statistics.median(method) * chunk, statistics.median(pred) * chunk


def _compute_seconds(db: Path) -> float:
    """Compute seconds summed over every unit: each row holds its call's seconds per image."""
    from engine.audit import AuditStore

    with AuditStore(db, create=False) as store:
        return sum(r.seconds for r in store.results(with_data=False) if r.kind in ("method", "prediction"))


def _commit_seconds(db: Path, tmp: Path) -> float:
    """The driver's cost to commit one row (its own transaction, synchronous=NORMAL), median."""
    from engine.audit import AuditStore

    with AuditStore(db, create=False) as src:
        rows = list(src.results())
    times = []
    with AuditStore(tmp / "commit.sqlite") as dst:
        for r in rows:
            t0 = time.perf_counter()
            dst.put(r)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=2)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime threads of the one-machine audit")
    parser.add_argument("--gpu-speedup", type=float, default=25.0, help="ASSUMED: a GPU vs one CPU thread")
    parser.add_argument(
        "--ray-data", action="store_true", help="also 2 workers with the images read by Ray Data (bytes)"
    )
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR)
    args = parser.parse_args(argv)
    work = prepare_workdir(args.workdir)

    import engine
    from engine.audit import AuditStore, Plan, audit
    from engine.audit.ray_backend import audit_on_ray, round_trip_seconds, start_local, stop_local

    model = efficientnet_onnx(work)
    paths = _photos(work, args.images)
    plan = Plan(methods=[("smoothgrad", {"samples": args.samples, "seed": 0})], chunk=args.chunk)
    results: dict = {"images": args.images, "chunk": args.chunk, "samples": args.samples}
    tmp = Path(tempfile.mkdtemp(dir=work))
    clf = engine.load(model, threads=args.threads)
    clf.gradient(np.zeros((1, *clf.input_shape), np.float32), 0)  # compile and build the session
    with AuditStore(tmp / "local.sqlite") as store:
        s = audit(clf, paths, store, plan)
    results["local_s"] = s.seconds
    results["local_rate"] = args.images / s.seconds  # images × methods (one method) per second

    start_local(num_cpus=2)
    try:
        results["ray_task_s"] = round_trip_seconds(200)
        # "2d": the same files read by Ray Data as bytes and decoded by the actors
        for run, workers in ((1, 1), (2, 2), *([("2d", 2)] if args.ray_data else [])):
            mark: dict = {}
            db = tmp / f"ray{run}.sqlite"
            t0 = time.perf_counter()
            with AuditStore(db) as store:
                audit_on_ray(
                    model,
                    None if run == "2d" else paths,
                    store,
                    plan,
                    dataset=[str(q) for q in paths] if run == "2d" else None,
                    workers=workers,
                    cpus_per_worker=0.5,
                    on_workers=lambda pool, mark=mark: mark.setdefault("up", time.perf_counter()),
                )
            end = time.perf_counter()
            results[f"ray{run}_startup_s"] = mark["up"] - t0
            results[f"ray{run}_s"] = end - mark["up"]
            results[f"ray{run}_rate"] = args.images / (end - mark["up"])
            # units in progress at once, on average: compute seconds summed over the wall time
            busy = _compute_seconds(db)
            results[f"ray{run}_concurrency"] = busy / (end - mark["up"])
    finally:
        stop_local()
    unit, pred = _unit_seconds(tmp / "ray1.sqlite", args.chunk)
    results["unit_s_one_thread"] = unit
    results["prediction_unit_s_one_thread"] = pred
    results["commit_row_s"] = _commit_seconds(tmp / "ray1.sqlite", tmp)
    results["scaling_2_over_1"] = results["ray2_rate"] / results["ray1_rate"]
    results["ray2_over_local"] = results["ray2_rate"] / results["local_rate"]

    r = results
    print(
        f"EfficientNet-Lite0, smoothgrad samples={args.samples}, {args.images} images "
        f"in chunks of {args.chunk}"
    )
    print(f"  one-machine audit ({args.threads} threads): {r['local_rate']:.2f} images×methods/s")
    for w in (1, 2):
        print(
            f"  Ray, {w} worker(s) × 1 thread:        {r[f'ray{w}_rate']:.2f} images×methods/s "
            f"(actors up in {r[f'ray{w}_startup_s']:.1f} s, not counted)"
        )
    if args.ray_data:
        r["ray_data_over_files"] = r["ray2d_rate"] / r["ray2_rate"]
        print(
            f"  Ray, 2 workers, images from Ray Data:  {r['ray2d_rate']:.2f} images×methods/s "
            f"({r['ray_data_over_files']:.2f}x the files decoded by the driver)"
        )
    met = "met" if r["scaling_2_over_1"] >= 1.7 else "NOT met"
    print(f"  scaling 2 / 1 workers: {r['scaling_2_over_1']:.2f}x (target >= 1.7x: {met})")
    r["load_average"] = os.getloadavg()
    print(
        f"  units computing at once: {r['ray1_concurrency']:.2f} (1 worker), {r['ray2_concurrency']:.2f} "
        f"(2 workers); host load average {r['load_average'][0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(f"  Ray 2 workers / one-machine audit: {r['ray2_over_local']:.2f}x")
    print(
        f"  measured per unit ({args.chunk} images): compute {unit * 1e3:.0f} ms on one CPU thread "
        f"(+ prediction {pred * 1e3:.1f} ms); Ray round trip {r['ray_task_s'] * 1e3:.2f} ms per task; "
        f"driver commit {r['commit_row_s'] * 1e3:.2f} ms per row"
    )
    # Projection. A GPU actor computes a unit in unit / speed-up seconds (ASSUMED speed-up); Ray
    # adds its round trip per unit; the one driver commits every row (one per image per method,
    # plus one prediction per image) in its own transaction, which caps the whole cluster.
    gpu_unit = unit / args.gpu_speedup + pred / args.gpu_speedup + r["ray_task_s"]
    driver_cap = 1.0 / (r["commit_row_s"] * (1 + 1 / 1))  # rows per image: map + prediction (1 method)
    print(f"  projection, GPU speed-up {args.gpu_speedup:g}x over one CPU thread ASSUMED (not measured):")
    proj = {}
    for nodes in (1, 4, 16):
        actors = nodes * 8
        compute = actors * args.chunk / gpu_unit
        rate = min(compute, driver_cap)
        proj[nodes] = rate
        bound = "driver commits" if driver_cap < compute else "GPU compute"
        print(
            f"    {nodes:2d} node(s) × 8 GPUs: {rate:8.0f} images×methods/s "
            f"(compute {compute:.0f}/s, driver {driver_cap:.0f}/s: bound by {bound})"
        )
    r["projection_images_methods_per_s"] = proj
    print(json.dumps(results, default=float))
    return results


if __name__ == "__main__":
    main()
