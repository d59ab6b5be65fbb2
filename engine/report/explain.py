"""The explain job: images × methods -> heatmap PNGs, maps, records and one HTML report.

Layout of the output folder::

    DIR/report.html              self-contained (images inline)
    DIR/results.json             one record per method (engine.report.record)
    DIR/<method>/<image>.png     heatmap over the photo
    DIR/<method>/maps.npz        attributions, inputs, record

Every file is written atomically; nothing in DIR is read back.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write_bytes
from . import heatmap, html
from .record import file_sha256, jsonable, method_record

Progress = Callable[[str], None]


def _stem_names(paths: list[Path]) -> list[str]:
    """File stems, made unique (two cat.png from two folders become cat, cat-2)."""
    names, used = [], {}
    for p in paths:
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in p.stem) or "image"
        used[stem] = used.get(stem, 0) + 1
        names.append(stem if used[stem] == 1 else f"{stem}-{used[stem]}")
    return names


def explain_to_dir(
    clf: Any,
    paths: list[Path],
    x: np.ndarray,
    decoded: list[dict],
    methods: list[str],
    params: dict[str, dict],
    out_dir: Path,
    *,
    target: int | None = None,
    output: str = "probability",
    scale: str = "own",
    progress: Progress | None = None,
) -> list[dict]:
    """``scale``: "own" (each heatmap its method's own post-processing) or "shared" (every image
    of one method on one colour scale, ``heatmap.shared_scale``)."""
    from ..methods import explain
    from ..methods.common import resolve_target

    out_dir.mkdir(parents=True, exist_ok=True)
    targets = resolve_target(clf, x, target)
    names = _stem_names(paths)
    images = [{"path": str(p), "sha256": file_sha256(p), "decoded": d} for p, d in zip(paths, decoded)]
    labels = clf.labels or []
    records, pngs, captions = [], {}, {}
    for k, method in enumerate(methods):
        if progress:
            progress(method, k, len(methods))
        start = time.perf_counter()
        maps = explain(clf, x, method, target=targets, output=output, **params.get(method, {}))
        seconds = time.perf_counter() - start
        if isinstance(maps, tuple):
            maps = maps[0]
        record = method_record(
            clf,
            method,
            params.get(method, {}),
            output=output,
            targets=targets,
            images=images,
            seconds=seconds,
        )
        record["colour_scale"] = scale
        folder = out_dir / method
        folder.mkdir(exist_ok=True)
        planes = heatmap.shared_scale(maps, clf.layout) if scale == "shared" else [None] * len(names)
        for i, name in enumerate(names):
            png = heatmap.render(x[i], maps[i], clf.layout, clf.input_range, method, h=planes[i])
            atomic_write_bytes(folder / f"{name}.png", png)
            pngs[(method, i)] = png
            k = int(targets[i])
            captions[(method, i)] = f"class {k}" + (f" {labels[k]}" if k < len(labels) else "")
        buf = io.BytesIO()
        np.savez_compressed(buf, attributions=maps, inputs=x, record=json.dumps(record))
        atomic_write_bytes(folder / "maps.npz", buf.getvalue())
        records.append(record)
    atomic_write_bytes(out_dir / "results.json", json.dumps(jsonable(records), indent=1).encode())
    atomic_write_bytes(
        out_dir / "report.html", explain_report(clf, names, methods, pngs, captions, records).encode()
    )
    if progress:
        progress("explained", len(methods), len(methods))
    return records


def explain_report(clf, names, methods, pngs, captions, records) -> str:
    model_rows = [
        {
            "model": str(clf.path or ""),
            "sha256": clf.sha256,
            "layout": clf.layout,
            "input range": str(list(clf.input_range)),
            "classes": clf.num_classes,
            "providers": ", ".join(clf.providers),
        },
    ]
    timing = [
        {"method": r["method"], "seconds": r["seconds"], "parameters": json.dumps(r["params"])[:300]}
        for r in records
    ]
    notes = "".join(f"<li>{html.esc(n)}</li>" for n in clf.notes)
    sections = [
        ("Model", html.table(model_rows) + (f"<ul>{notes}</ul>" if notes else "")),
        ("Explanations", html.grid(names, methods, pngs, captions)),
        ("Timings and parameters", html.table(timing)),
        ("Versions", html.table([records[0]["versions"]]) if records else ""),
    ]
    return html.page(f"onnxplain: {Path(str(clf.path or 'model')).name}", sections)
