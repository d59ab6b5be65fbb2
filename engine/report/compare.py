"""The compare job: two models, the same images, several methods -> compare.json and report.html."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write_bytes
from ..compare import aggregate, explanation_agreement, model_agreement
from ..errors import OnnxplainError
from . import heatmap, html
from .record import file_sha256, jsonable, versions


def compare_to_dir(
    a: Any,
    b: Any,
    paths: list[Path],
    xa: np.ndarray,
    xb: np.ndarray,
    methods: list[str],
    params: dict[str, dict],
    out_dir: Path | None,
    *,
    output: str = "probability",
    top_fraction: float = 0.05,
    progress=None,
) -> dict:
    """Model agreement, then per method the agreement of the maps for the class model a predicts
    (both models explain the same class, so a disagreement in top-1 does not hide in the maps)."""
    from ..methods import explain

    agreement = model_agreement(a, b, xa, xb)  # each model reads the photos in its own layout
    targets = np.asarray(agreement.top1_a, np.int64)
    result: dict = {
        "kind": "comparison",
        "models": [{"path": str(m.path or ""), "sha256": m.sha256, "layout": m.layout} for m in (a, b)],
        "images": [{"path": str(p), "sha256": file_sha256(p)} for p in paths],
        "models_agree": agreement.to_dict(),
        "methods": {},
        "versions": versions(),
    }
    pngs, captions = {}, {}
    for k, method in enumerate(methods):
        if progress:
            progress(method, k, len(methods))
        got = []
        for tag, clf, x in (("a", a, xa), ("b", b, xb)):
            try:
                got.append(explain(clf, x, method, target=targets, output=output, **params.get(method, {})))
            except OnnxplainError as e:  # e.g. no gradient through an int8 model's QuantizeLinear
                got.append(f"model {tag}: {e}")
        if any(isinstance(g, str) for g in got):
            reason = "; ".join(g for g in got if isinstance(g, str))
            result["methods"][method] = {"params": jsonable(params.get(method, {})), "error": reason}
            continue
        ma, mb = got
        ma, mb = (m[0] if isinstance(m, tuple) else m for m in (ma, mb))
        rows = explanation_agreement(
            _to_nchw(ma, a.layout), _to_nchw(mb, b.layout), "NCHW", top_fraction=top_fraction
        )
        result["methods"][method] = {
            "params": jsonable(params.get(method, {})),
            "per_image": rows,
            "aggregate": aggregate(rows),
        }
        # One colour scale per method across both models and every image: brightness compares.
        shared = heatmap.shared_scale([*_to_nchw(ma, a.layout), *_to_nchw(mb, b.layout)], "NCHW")
        for i in range(len(paths)):
            for k, (tag, m, x, clf) in enumerate((("a", ma, xa, a), ("b", mb, xb, b))):
                pngs[(f"{method} ({tag})", i)] = heatmap.render(
                    x[i], m[i], clf.layout, clf.input_range, method, h=shared[k * len(paths) + i]
                )
            r = rows[i]
            captions[(f"{method} (b)", i)] = f"ρ {r['spearman']:.3f}, SSIM {r['ssim']:.3f}"
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out_dir / "compare.json", json.dumps(jsonable(result), indent=1).encode())
        names = [p.name for p in paths]
        done = [m for m in methods if "error" not in result["methods"][m]]
        columns = [f"{m} ({t})" for m in done for t in ("a", "b")]
        atomic_write_bytes(out_dir / "report.html", _report(result, names, columns, pngs, captions).encode())
    if progress:
        progress("compared", len(methods), len(methods))
    return result


def _to_nchw(maps: np.ndarray, layout: str | None) -> np.ndarray:
    return np.moveaxis(maps, -1, 1) if layout == "NHWC" and maps.ndim == 4 else maps


def _report(result, names, columns, pngs, captions) -> str:
    agree = result["models_agree"]
    summary = [
        {k: agree[k] for k in ("max_abs_logit_diff", "relative_logit_diff", "top1_agreement", "mean_kl")}
    ]
    per_method = [
        {"method": m, **{f"{k} (mean)": v["mean"] for k, v in d["aggregate"].items()}}
        for m, d in result["methods"].items()
        if "error" not in d
    ]
    failed = [{"method": m, "not compared": d["error"]} for m, d in result["methods"].items() if "error" in d]
    models = [{"model": m["path"], "sha256": m["sha256"], "layout": m["layout"]} for m in result["models"]]
    return html.page(
        "onnxplain compare",
        [
            ("Models", html.table(models)),
            ("Do the models agree?", html.table(summary)),
            ("Do the explanations agree?", html.table(per_method) + (html.table(failed) if failed else "")),
            ("Heatmaps (a, b)", html.grid(names, columns, pngs, captions)),
        ],
    )
