"""The same portable gradient model on two ONNX runtimes: onnxruntime (with its tuned rewrites,
applied at load) and OpenVINO's CPU plugin. EfficientNet-Lite0, batch 16, forward + input
gradient; prints both timings, the ratio and how far the gradients agree.

    python -m bench.runtimes [--work DIR] [--batch 16] [--repeats 5]
"""

from __future__ import annotations

import argparse

import numpy as np

from bench.common import (
    DEFAULT_WORKDIR,
    efficientnet_onnx,
    median_seconds,
    photo_batch,
    prepare_workdir,
    relative_difference,
    relative_l2,
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=DEFAULT_WORKDIR)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    import engine
    from engine.compile import compile_to_file

    work = prepare_workdir(args.work)
    model = efficientnet_onnx(work)
    grad = work / "efficientnet_lite0.portable.grad.onnx"
    if not grad.exists():
        compile_to_file(model, grad)
    x = photo_batch(args.batch)
    target = np.arange(args.batch) % 1000
    results = {}
    for runtime in ("onnxruntime", "openvino"):
        clf = engine.load(model, gradient_model=grad, runtime=runtime)
        seconds, (_, grads) = median_seconds(
            lambda c=clf: c.gradient(x, target, output="probability"), args.repeats
        )
        forward, _ = median_seconds(lambda c=clf: c.predict(x), args.repeats)
        results[runtime] = (seconds, forward, grads)
        print(f"{runtime:12s} gradient {seconds:.3f} s  forward {forward:.3f} s  ({clf.providers[0]})")
    ort_s, _, ort_g = results["onnxruntime"]
    ov_s, _, ov_g = results["openvino"]
    print(
        f"openvino / onnxruntime: {ov_s / ort_s:.2f}; gradients agree to "
        f"{relative_difference(ov_g, ort_g):.2e} of scale (max), {relative_l2(ov_g, ort_g):.2e} (L2)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
