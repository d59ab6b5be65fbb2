"""Peak memory of Integrated Gradients against steps (issue #9 §3): onnxplain's streamed IG vs
captum's IntegratedGradients with and without ``internal_batch_size``, EfficientNet-Lite0 224x224.

Every (implementation, steps) runs in its own process, because the peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is a high-water mark of the whole process; the
runtimes' own allocators (onnxruntime's arena, torch's CPU allocator) are invisible to
tracemalloc, so RSS is the honest figure. Each child loads its model, runs a 2-step warm-up on
the same photos (session creation, gradient-model loading, allocator growth), notes its RSS, then
runs IG once and reports the peak and the growth above that RSS.

    python -m bench.memory [--images 4] [--steps 64 256 1024] [--captum-batch 16]
                           [--unbatched-steps 64] [--threads 2] [--workdir DIR]
    python -m bench.memory --quick    # 1 image, steps 16 64 256

captum without internal_batch_size puts steps × images rows in one torch batch: it is run only for
steps up to ``--unbatched-steps`` (the rest would need tens of GB).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from bench.common import DEFAULT_WORKDIR, efficientnet_onnx, photo_batch, prepare_workdir

KINDS = ("ours", "captum_batched", "captum")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(kind: str, steps: int, images: int, captum_batch: int, threads: int, workdir: str) -> dict:
    """One measurement, in this (fresh) process."""
    import numpy as np

    work = prepare_workdir(workdir)
    x = photo_batch(images)
    if kind == "ours":
        import engine

        clf = engine.load(efficientnet_onnx(work), providers=["CPUExecutionProvider"], threads=threads)
        target = clf.predict(x).argmax(axis=1)

        def run(n):
            return engine.explain(
                clf, x, "integrated_gradients", target=target, baseline="black", steps=n,
                quadrature="gausslegendre",
            )  # fmt: skip

        extra = {"batch_size": clf.batch_size}
    else:
        import torch
        from captum.attr import IntegratedGradients

        from bench.common import torch_efficientnet

        torch.set_num_threads(threads)
        net = torch_efficientnet()
        xt = torch.from_numpy(x)
        with torch.no_grad():
            target = net(xt).argmax(dim=1).tolist()
        ig = IntegratedGradients(lambda inp: torch.softmax(net(inp), dim=1))
        batch = captum_batch if kind == "captum_batched" else None

        def run(n):
            return ig.attribute(
                xt, baselines=torch.zeros_like(xt), target=target, n_steps=n, method="gausslegendre",
                internal_batch_size=batch,
            ).detach().numpy()  # fmt: skip

        extra = {"internal_batch_size": batch}
    run(2)
    before = rss_mib()
    start = time.perf_counter()
    attr = run(steps)
    seconds = time.perf_counter() - start
    peak = peak_mib()
    return {
        "kind": kind, "steps": steps, "images": images, "seconds": seconds, "rss_before_mib": before,
        "peak_mib": peak, "growth_mib": max(0.0, peak - before), "finite": bool(np.isfinite(attr).all()),
    } | extra  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=None)
    p.add_argument("--steps", type=int, nargs="+", default=None)
    p.add_argument("--captum-batch", type=int, default=16)
    p.add_argument("--unbatched-steps", type=int, default=64, help="largest steps for captum unbatched")
    p.add_argument("--only", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default=DEFAULT_WORKDIR)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--child", nargs=2, metavar=("KIND", "STEPS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.images is None:
        args.images = 1 if args.quick else 4
    if args.steps is None:
        args.steps = [16, 64, 256] if args.quick else [64, 256, 1024]
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.child:
        kind, steps = args.child[0], int(args.child[1])
        result = child(kind, steps, args.images, args.captum_batch, args.threads, args.workdir)
        print("RESULT " + json.dumps(result))
        return [result]
    efficientnet_onnx(prepare_workdir(args.workdir))  # export once, before the children race
    results = []
    for steps in args.steps:
        for kind in args.only:
            if kind == "captum" and steps > args.unbatched_steps:
                print(f"{kind:15s} steps {steps:5d}: skipped (> --unbatched-steps {args.unbatched_steps})")
                continue
            cmd = [sys.executable, "-m", "bench.memory", "--child", kind, str(steps)]
            cmd += ["--images", str(args.images), "--captum-batch", str(args.captum_batch)]
            cmd += ["--threads", str(args.threads), "--workdir", args.workdir]
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if out.returncode or line is None:
                print(
                    f"{kind:15s} steps {steps:5d}: FAILED (rc {out.returncode}) {out.stderr.strip()[-300:]}"
                )
                continue
            r = json.loads(line[len("RESULT ") :])
            results.append(r)
            print(
                f"{kind:15s} steps {steps:5d}: peak RSS {r['peak_mib']:8.0f} MiB, "
                f"+{r['growth_mib']:7.0f} MiB over {r['rss_before_mib']:6.0f} MiB, {r['seconds']:7.1f} s",
                flush=True,
            )
    print_summary(results, args)
    path = prepare_workdir(args.workdir) / "memory_bench.json"
    path.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return results


def print_summary(results: list[dict], args: argparse.Namespace) -> None:
    by = {(r["kind"], r["steps"]): r for r in results}
    print(
        f"\nIG on {args.images} EfficientNet-Lite0 photos, gausslegendre, {args.threads} threads: "
        f"peak RSS growth (MiB) and the ratio ours / peer"
    )
    batched = f"captum b={args.captum_batch}"
    print(f"{'steps':>6s} {'ours':>8s} {batched:>12s} {'ratio':>6s} {'captum':>8s} {'ratio':>6s}")
    for steps in args.steps:
        ours = by.get(("ours", steps))
        cells = [f"{steps:6d}", f"{ours['growth_mib']:8.0f}" if ours else f"{'-':>8s}"]
        for kind, width in (("captum_batched", 12), ("captum", 8)):
            r = by.get((kind, steps))
            cells.append(f"{r['growth_mib']:{width}.0f}" if r else f"{'-':>{width}s}")
            ratio = ours["growth_mib"] / r["growth_mib"] if ours and r and r["growth_mib"] > 0 else None
            cells.append(f"{ratio:6.2f}" if ratio is not None else f"{'-':>6s}")
        print(" ".join(cells))


if __name__ == "__main__":
    main()
