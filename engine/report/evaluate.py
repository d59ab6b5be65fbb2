"""The evaluate job: maps (computed here or loaded from an explain .npz) scored by metrics ->
results.json (one MetricResult record per image, method and metric), curve plots and report.html.
"""

from __future__ import annotations

import io
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write_bytes
from . import html
from .record import jsonable, versions


def curve_plot(curves: dict[str, list[tuple[np.ndarray, np.ndarray]]], title: str) -> bytes:
    """PNG: the mean curve of each method (curves resampled onto [0, 1] when their x differ)."""
    import matplotlib

    matplotlib.use("Agg")  # no display; reports only
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 3.0), dpi=100)
    try:
        for name, pairs in curves.items():
            grid = np.linspace(0, 1, 101)
            ys = []
            for cx, cy in pairs:
                cx = np.asarray(cx, np.float64)
                span = cx.max() - cx.min() if cx.size > 1 else 1.0
                ys.append(np.interp(grid, (cx - cx.min()) / (span or 1.0), np.asarray(cy, np.float64)))
            ax.plot(grid, np.mean(ys, axis=0), label=name)
        ax.set_xlabel("fraction of the curve")
        ax.set_ylabel("score")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)


def evaluate_to_dir(
    clf: Any,
    x: np.ndarray,
    maps: dict[str, np.ndarray],
    metrics: list[str],
    params: dict[str, dict],
    out_dir: Path | None,
    *,
    targets: np.ndarray,
    images: list[dict],
    method_params: dict[str, dict] | None = None,
    progress=None,
) -> dict:
    """Score every method's maps with every metric; write the outputs when ``out_dir`` is given."""
    from ..metrics import METRICS, evaluate, for_method, metric_parameters
    from ..metrics.pointing import pointing_accuracy

    method_params = method_params or {}

    results: list[dict] = []
    table: dict[str, dict[str, float]] = defaultdict(dict)
    curves: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    seconds: dict[str, float] = {}
    steps, total = 0, len(metrics) * len(maps)
    for metric in metrics:
        full = {**metric_parameters(metric), **params.get(metric, {})}
        # per-image ground truth goes into each image's own record, not into every record's params
        truth = {k: full.pop(k) for k in ("boxes", "masks") if full.get(k) is not None}
        for method, m in maps.items():
            if progress:
                progress(f"{metric} of {method}", steps, total)
            steps += 1
            start = time.perf_counter()
            given = for_method(metric, params.get(metric, {}), method, method_params.get(method, {}))
            scored = evaluate(clf, x, m, metric, target=targets, **given)
            seconds[f"{metric} / {method}"] = time.perf_counter() - start
            for i, r in enumerate(scored):
                d = r.to_dict()
                d.update(method=method, image=images[i], params=jsonable(full))
                if "boxes" in truth:
                    d["boxes"] = jsonable(truth["boxes"][i])
                results.append(d)
                if r.curve_x is not None and r.curve_y is not None:
                    curves[metric][method].append((r.curve_x, r.curve_y))
            arrow = "↑" if METRICS[metric].higher_is_better else "↓"
            if metric == "pointing_game":  # the paper's figure: hits / total per class, mean over classes
                table[method][f"{metric} {arrow}"] = pointing_accuracy(scored)["accuracy"]
            else:
                table[method][f"{metric} {arrow}"] = _mean([r.score for r in scored])
    if progress:
        progress("evaluated", total, total)
    summary = {
        "kind": "evaluation",
        "model_sha256": clf.sha256,
        "metrics": {m: dict(row) for m, row in table.items()},
        "results": results,
        "seconds": seconds,
        "versions": versions(),
    }
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out_dir / "results.json", json.dumps(jsonable(summary), indent=1).encode())
        plots = {metric: curve_plot(by_method, metric) for metric, by_method in curves.items()}
        for metric, png in plots.items():
            atomic_write_bytes(out_dir / f"{metric}.png", png)
        rows = [{"method": m, **row} for m, row in table.items()]
        figures = "".join(f'<img alt="{html.esc(k)}" src="{html.data_uri(v)}">' for k, v in plots.items())
        sections = [
            ("Model", html.table([{"model": str(clf.path or ""), "sha256": clf.sha256}])),
            ("Metrics (mean over images)", html.table(rows)),
            ("Curves", figures or "<p class=muted>no curves</p>"),
            ("Timings (seconds)", html.table([{"step": k, "seconds": v} for k, v in seconds.items()])),
        ]
        page = html.page(f"onnxplain evaluate: {Path(str(clf.path or 'model')).name}", sections)
        atomic_write_bytes(out_dir / "report.html", page.encode())
    return summary


def _mean(scores: list[float]) -> float | None:
    """The mean over the images that have a score (SIC/AIC skip some, score NaN; PAIR's rule)."""
    finite = [s for s in scores if np.isfinite(s)]
    return float(np.mean(finite)) if finite else None
