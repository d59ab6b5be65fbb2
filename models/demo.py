"""`make demo`: export the pretrained EfficientNet-Lite0, compile its gradient model, print the
top-5 predictions for the bundled photos and the gradient self-check.

    python -m models.demo [--out out/demo]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="onnxplain demo")
    parser.add_argument("--out", default="out/demo", help="folder for the exported models")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import engine
    from engine.compile import compile_to_file
    from models.efficientnet import export_efficientnet_lite0
    from models.images import sample_images

    model_path = out / "efficientnet_lite0.onnx"
    grad_path = out / "efficientnet_lite0.gradient.onnx"
    t = time.perf_counter()
    if not model_path.exists():
        print(export_efficientnet_lite0(model_path))
        print(f"  exported in {time.perf_counter() - t:.1f} s")
    else:
        print(f"{model_path}: already exported")
    clf = engine.load(model_path)
    if not grad_path.exists() or grad_path.stat().st_mtime < model_path.stat().st_mtime:
        t = time.perf_counter()
        info = compile_to_file(model_path, grad_path)
        print(
            f"{grad_path}: gradient model compiled in {time.perf_counter() - t:.1f} s "
            f"(lowered {', '.join(info.lowered_ops)})"
        )
    clf = engine.load(model_path, gradient_model=grad_path)
    info = clf._compiled[("gradient", None)][1]

    photos, names = sample_images(size=224)
    logits = clf.predict(photos)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    print(f"\nTop-5 predictions ({clf}, providers {clf.providers}):")
    for name, p in zip(names, probs):
        top = np.argsort(-p)[:5]
        print(f"  {name:12s} " + ", ".join(f"{clf.labels[k]} {p[k]:.1%}" for k in top))

    check = info.self_check
    print(f"\nGradient self-check against onnxruntime-training's own graph: {check['status']}")
    if check["status"] == "passed":
        g = check[info.input_gradient]
        print(
            f"  max |lowered - builder| = {g['max_abs_error']:.2e} (gradient scale {g['scale']:.2e}, "
            f"batch {check['batch']}, random inputs)"
        )
    target = probs.argmax(1)
    t = time.perf_counter()
    scores, grads = clf.gradient(photos, target, output="probability")
    print(
        f"  d p(top-1) / d x for {len(photos)} photos in {time.perf_counter() - t:.2f} s; "
        f"p = {np.round(scores, 3).tolist()}, |grad|max = {np.abs(grads).max():.3g}"
    )
    # A finite-difference spot check along the gradient direction: f(x + h d) - f(x - h d) ≈ 2h |g|²/|g|
    d = grads / np.linalg.norm(grads.reshape(len(grads), -1), axis=1)[:, None, None, None]
    h = 1e-3
    fp = _prob(clf.predict(photos + h * d), target)
    fm = _prob(clf.predict(photos - h * d), target)
    fd = (fp - fm) / (2 * h)
    directional = np.linalg.norm(grads.reshape(len(grads), -1), axis=1)
    print(
        "  finite-difference check of the directional derivative: "
        + ", ".join(f"{a:.4f} vs {b:.4f}" for a, b in zip(fd, directional))
    )
    return 0


def _prob(logits, target):
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return p[np.arange(len(p)), target]


if __name__ == "__main__":
    raise SystemExit(main())
