"""`make demo` / `onnxplain demo`: the main job on its embedded default, end to end.

The pretrained EfficientNet-Lite0 (PyTorch) and the four bundled photos -> every attribution
method -> insertion/deletion and the other metrics -> the same network ported to Keras and
exported through tf2onnx, compared with the PyTorch export -> one HTML report. Exports and
compiled gradient models are kept in the output folder, so a second run is quicker.

    python -m models.demo [--out out/demo] [--quick]

The heavy methods run with lighter settings than their defaults (``DEMO_PARAMS``, printed and
kept in the report's records) so the whole demo fits in about five minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import base64
import json
import time
from pathlib import Path

import numpy as np

# Lighter than the defaults where a method's cost is many model calls per image.
DEMO_PARAMS: dict[str, dict] = {
    "smoothgrad": {"samples": 8},
    "integrated_gradients": {"steps": 16},
    "blur_ig": {"steps": 16},
    "guided_ig": {"steps": 16},
    "agi": {"classes": 3, "max_steps": 8},
    "igos": {"iterations": 5, "points": 5, "noise_std": 0.045},
    "igos_pp": {"iterations": 3, "points": 3, "noise_std": 0.045},
    "mask": {"iterations": 30},
    "rise": {"n_masks": 500, "baseline": 0.5},
    "occlusion": {"window": 56, "stride": 28, "fill": 0.5},
    "xrai": {"steps": 8},
}
QUICK_METHODS = ["saliency", "integrated_gradients", "grad_cam", "rise"]
# Insertion/deletion at 1/50 of the image per step: 51 points per curve instead of 225.
METRIC_PARAMS: dict[str, dict] = {"insertion": {"step": 1004}, "deletion": {"step": 1004}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="onnxplain demo")
    parser.add_argument("--out", default="out/demo", help="folder for models, report and records")
    parser.add_argument("--quick", action="store_true", help="four methods only")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    import engine
    from engine.images import read_images
    from engine.methods import METHODS
    from engine.metrics import METRICS
    from models.images import sample_images

    torch_path = _export_torch(out)
    clf = engine.load(torch_path)
    t = time.perf_counter()
    clf.gradient(np.zeros((1, *clf.input_shape), np.float32), 0)  # compile (or load from the cache)
    info = clf._compiled[("gradient", None)][1]
    print(
        f"gradient model ready in {time.perf_counter() - t:.1f} s; self-check {info.self_check.get('status')}"
    )

    photos, names = sample_images(size=224)
    photo_dir = out / "photos"
    photo_dir.mkdir(exist_ok=True)
    from PIL import Image

    paths = []
    for name, p in zip(names, photos):
        path = photo_dir / f"{name}.png"
        Image.fromarray((np.moveaxis(p, 0, -1) * 255).round().astype(np.uint8)).save(path)
        paths.append(path)
    x, decoded = read_images(paths, clf.input_shape, clf.layout, clf.input_range)
    probs = _softmax(clf.predict(x))
    print(f"\nTop-3 predictions ({clf.providers[0]}):")
    for name, p in zip(names, probs):
        top = np.argsort(-p)[:3]
        print(f"  {name:10s} " + ", ".join(f"{clf.labels[k]} {p[k]:.1%}" for k in top))

    methods = QUICK_METHODS if args.quick else list(METHODS)
    params = {m: DEMO_PARAMS.get(m, {}) for m in methods}
    from engine.report.explain import explain_to_dir

    print(f"\nExplaining {len(x)} photos with {len(methods)} methods ...")
    records = explain_to_dir(
        clf, paths, x, [d.to_dict() for d in decoded], methods, params, out / "explain", progress=_print_step
    )
    for r in records:
        print(f"  {r['method']:22s} {r['seconds']:6.1f} s")

    metrics = [m for m in ("insertion", "deletion") if m in METRICS]
    evaluation = None
    if metrics:
        from engine.methods.common import resolve_target
        from engine.report.evaluate import evaluate_to_dir

        maps = {}
        for m in methods:
            with np.load(out / "explain" / m / "maps.npz", allow_pickle=False) as z:
                maps[m] = z["attributions"]
        metric_params = {m: METRIC_PARAMS.get(m, {}) for m in metrics}
        print(f"\nScoring with {', '.join(metrics)} ...")
        t = time.perf_counter()
        evaluation = evaluate_to_dir(
            clf,
            x,
            maps,
            metrics,
            metric_params,
            out / "evaluate",
            targets=resolve_target(clf, x, None),
            images=[{"path": str(p)} for p in paths],
        )
        print(f"  done in {time.perf_counter() - t:.1f} s")
        for method, row in evaluation["metrics"].items():
            print(
                f"  {method:22s} "
                + "  ".join(f"{k} {'n/a' if v is None else format(v, '.3f')}" for k, v in row.items())
            )

    comparison = _compare_keras_port(out, clf, paths)
    report = out / "report.html"
    _write_report(report, clf, out, methods, evaluation, comparison)
    print(f"\nwrote {report} ({time.perf_counter() - start:.0f} s in all)")
    return 0


def _print_step(step: str, done: int | None = None, total: int | None = None) -> None:
    if total:
        print(f"  [{done}/{total}] {step}", flush=True)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _export_torch(out: Path) -> Path:
    from models.efficientnet import export_efficientnet_lite0

    path = out / "efficientnet_lite0.onnx"
    if not path.exists():
        t = time.perf_counter()
        print(export_efficientnet_lite0(path))
        print(f"  exported in {time.perf_counter() - t:.1f} s")
    return path


def _compare_keras_port(out: Path, clf, paths) -> dict | None:
    """The same weights in a Keras implementation, exported through tf2onnx, against the PyTorch
    export: predictions and explanations must agree to float rounding."""
    try:
        from models.efficientnet_keras import export_keras_efficientnet_lite0
    except ImportError as e:  # TensorFlow not installed (the tf extra)
        print(f"\nKeras port skipped: {e}")
        return None
    import engine
    from engine.images import read_images
    from engine.report.compare import compare_to_dir

    path = out / "efficientnet_lite0_keras.onnx"
    if not path.exists():
        t = time.perf_counter()
        export_keras_efficientnet_lite0(path)
        print(f"\nKeras port exported through tf2onnx in {time.perf_counter() - t:.1f} s")
    keras_clf = engine.load(path)
    xa, _ = read_images(paths, clf.input_shape, clf.layout, clf.input_range)
    xb, _ = read_images(paths, keras_clf.input_shape, keras_clf.layout, keras_clf.input_range)
    methods = ["saliency", "integrated_gradients"]
    result = compare_to_dir(
        clf, keras_clf, paths, xa, xb, methods, {"integrated_gradients": {"steps": 16}}, out / "compare"
    )
    agree = result["models_agree"]
    print(
        f"\nPyTorch export vs Keras port: max |logit difference| {agree['max_abs_logit_diff']:.2g} "
        f"({agree['relative_logit_diff']:.2g} of scale), top-1 agreement {agree['top1_agreement']:.0%}"
    )
    for m, d in result["methods"].items():
        g = d.get("aggregate", {})
        if g:
            print(f"  {m:22s} Spearman {g['spearman']['mean']:.5f}  SSIM {g['ssim']['mean']:.5f}")
    return result


def _write_report(path: Path, clf, out: Path, methods, evaluation, comparison) -> None:
    """One self-contained page: the explain grid, the metric table and curves, the compare."""
    from engine.atomic import atomic_write_bytes
    from engine.report import html

    def img(file: Path, alt: str) -> str:
        data = base64.b64encode(file.read_bytes()).decode("ascii")
        return f'<img alt="{html.esc(alt)}" src="data:image/png;base64,{data}">'

    names = sorted(p.stem for p in (out / "explain" / methods[0]).glob("*.png"))
    head = "<th>image</th>" + "".join(f"<th>{html.esc(m)}</th>" for m in methods)
    rows = []
    for n in names:
        cells = "".join(f"<td>{img(out / 'explain' / m / f'{n}.png', f'{m} {n}')}</td>" for m in methods)
        rows.append(f"<tr><td>{html.esc(n)}</td>{cells}</tr>")
    records = json.loads((out / "explain" / "results.json").read_text())
    sections = [
        (
            "Model",
            html.table(
                [{"model": str(clf.path), "sha256": clf.sha256, "providers": ", ".join(clf.providers)}]
            ),
        ),
        ("Explanations", f"<table class=grid><tr>{head}</tr>{''.join(rows)}</table>"),
        (
            "Timings and parameters",
            html.table(
                [
                    {
                        "method": r["method"],
                        "seconds": r["seconds"],
                        "parameters": json.dumps(r["params"])[:200],
                    }
                    for r in records
                ]
            ),
        ),
    ]
    if evaluation:
        table = [{"method": m, **row} for m, row in evaluation["metrics"].items()]
        curves = "".join(img(p, p.stem) for p in sorted((out / "evaluate").glob("*.png")))
        sections += [("Metrics (mean over the photos)", html.table(table)), ("Curves", curves)]
    if comparison:
        agree = comparison["models_agree"]
        summary = {
            k: agree[k] for k in ("max_abs_logit_diff", "relative_logit_diff", "top1_agreement", "mean_kl")
        }
        per_method = [
            {"method": m, **{f"{k} (mean)": v["mean"] for k, v in d["aggregate"].items()}}
            for m, d in comparison["methods"].items()
            if "aggregate" in d
        ]
        sections += [
            ("PyTorch export vs Keras port: predictions", html.table([summary])),
            ("PyTorch export vs Keras port: explanations", html.table(per_method)),
        ]
    atomic_write_bytes(path, html.page("onnxplain demo: EfficientNet-Lite0", sections).encode())


if __name__ == "__main__":
    raise SystemExit(main())
