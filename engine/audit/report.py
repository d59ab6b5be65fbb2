"""Reports from audit databases alone: no model, no image file is read.

``audit_report(store)``: the model, an image × method grid of heatmaps drawn over the stored
pictures, the metric table (mean per method, with each metric's direction) and the timings.
``compare_stores(a, b)``: two audits of two model versions, matched by image digest, method and
parameters: the model agreement from the stored logits and the explanation agreement of the maps.
"""

from __future__ import annotations

import io
import json
from collections import defaultdict

import numpy as np
from PIL import Image

from ..compare import aggregate, explanation_agreement, heatmaps, logit_agreement
from ..report import heatmap, html
from .store import AuditStore


def _column(name: str, params: dict, params_seen: dict[str, set]) -> str:
    """A method's column label: its name, plus its parameters when one method ran with several."""
    if len(params_seen.get(name, ())) <= 1:
        return name
    return f"{name} {json.dumps(params, sort_keys=True)[:60]}"


def _picture(blob: bytes) -> np.ndarray:
    img = np.asarray(Image.open(io.BytesIO(blob)), np.float64) / 255
    return img[..., None] if img.ndim == 2 else img


def summarise(store: AuditStore) -> dict:
    """Everything the report shows, as plain data (also what `onnxplain report --json` prints)."""
    models = store.models()
    images = store.images()
    position = {im["sha256"]: k for k, im in enumerate(images)}
    params_seen: dict[str, set] = defaultdict(set)
    for r in store.results("method", with_data=False):
        params_seen[r.name].add(json.dumps(r.params, sort_keys=True))
    columns: list[str] = []
    by_key: dict[str, str] = {}
    seconds: dict[str, float] = defaultdict(float)
    for r in store.results("method", with_data=False):
        col = _column(r.name, r.params, params_seen)
        by_key[r.key] = col
        seconds[col] += r.seconds or 0.0
        if col not in columns:
            columns.append(col)
    scores: dict[tuple[str, str], list[float]] = defaultdict(list)
    direction: dict[str, bool] = {}
    for r in store.results("metric", with_data=False):
        col = by_key.get(r.source or "")
        if col is None or r.score is None:
            continue
        scores[(col, r.name)].append(float(r.score))
        direction[r.name] = bool(r.record.get("higher_is_better", True))
    metric_rows = []
    for col in columns:
        row: dict = {"method": col}
        for metric in direction:
            vals = scores.get((col, metric), [])
            arrow = "↑" if direction[metric] else "↓"
            row[f"{metric} {arrow}"] = float(np.nanmean(vals)) if np.isfinite(vals).any() else None
        metric_rows.append(row)
    return {
        "models": [{k: v for k, v in m.items() if k != "labels"} for m in models],
        "images": [{"path": im["path"], "sha256": im["sha256"]} for im in images],
        "methods": columns,
        "metrics": metric_rows,
        "seconds": dict(seconds),
        "counts": {k: store.count(k) for k in ("prediction", "method", "metric")},
        "_position": position,
        "_by_key": by_key,
    }


def audit_report(store: AuditStore) -> str:
    """The HTML report of one audit database."""
    s = summarise(store)
    models = s["models"]
    layout = models[0]["layout"] if models else "NCHW"
    images = store.images()
    pictures = {im["sha256"]: _picture(im["picture"]) for im in images}
    names = [im["path"].rsplit("/", 1)[-1] for im in images]
    stored = store.models()
    labels = stored[0].get("labels", []) if stored else []
    pngs, captions = {}, {}
    for r in store.results("method"):
        col = s["_by_key"][r.key]
        i = s["_position"].get(r.image_sha256)
        if i is None or r.data is None:
            continue
        pic = pictures[r.image_sha256]
        x = np.moveaxis(pic, -1, 0) if layout == "NCHW" else pic
        pngs[(col, i)] = heatmap.render(x, r.data, layout, (0.0, 1.0), r.name)
        k = r.target
        captions[(col, i)] = f"class {k}" + (f" {labels[k]}" if k is not None and k < len(labels) else "")
    model_rows = [
        {
            "model": m.get("path"),
            "sha256": m["sha256"],
            "layout": m.get("layout"),
            "classes": m.get("num_classes"),
            "providers": ", ".join(m.get("providers", [])),
        }
        for m in models
    ]
    timing = [{"method": c, "seconds": t} for c, t in s["seconds"].items()]
    counts = [s["counts"]]
    sections = [
        ("Model", html.table(model_rows)),
        ("Results stored", html.table(counts)),
        ("Explanations", html.grid(names, s["methods"], pngs, captions)),
        (
            "Metrics (mean over images)",
            html.table([r for r in s["metrics"] if len(r) > 1]),  # rows with at least one metric
        ),
        ("Timings (seconds)", html.table(timing)),
    ]
    versions = models[0].get("versions") if models else None
    if versions:
        sections.append(("Versions", html.table([versions])))
    return html.page(f"onnxplain audit: {store.path.name}", sections)


def compare_stores(a: AuditStore, b: AuditStore, *, top_fraction: float = 0.05) -> dict:
    """Two audits matched row by row: logits by image, maps by (image, method, parameters)."""
    pa = {r.image_sha256: r for r in a.results("prediction")}
    pb = {r.image_sha256: r for r in b.results("prediction")}
    common = [d for d in pa if d in pb]
    result: dict = {"kind": "audit comparison", "images": len(common), "models": [a.models(), b.models()]}
    if common:
        agreement = logit_agreement(
            np.stack([pa[d].data for d in common]), np.stack([pb[d].data for d in common])
        )
        result["models_agree"] = agreement.to_dict()
    layout_a = (a.models() or [{}])[0].get("layout")
    layout_b = (b.models() or [{}])[0].get("layout")

    def maps(store: AuditStore) -> dict:
        return {
            (r.image_sha256, r.name, json.dumps(r.params, sort_keys=True), r.target): r.data
            for r in store.results("method")
        }

    ma, mb = maps(a), maps(b)
    methods: dict[str, list] = defaultdict(list)
    for key, da in ma.items():
        db = mb.get(key)
        if db is None:
            continue
        # each map reduced in its own model's layout (Σ|channels|), then compared as 2-D maps
        ha, hb = heatmaps(da[None], layout_a), heatmaps(db[None], layout_b)
        row = explanation_agreement(ha, hb, None, top_fraction=top_fraction)[0]
        methods[key[1]].append({"image": key[0], **row})
    result["methods"] = {m: {"per_image": rows, "aggregate": aggregate(rows)} for m, rows in methods.items()}
    return result
