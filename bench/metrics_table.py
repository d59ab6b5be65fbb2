"""What the metrics say on EfficientNet-Lite0 and the bundled photos: method × insertion,
deletion, SIC, AIC (the README's table). Reads the maps `make demo` wrote (out/demo/explain).

    python -m bench.metrics_table [--demo out/demo] [--min-pred 0.8]

Insertion and deletion use the "paper" preset (RISE's settings, map reduced by its channel sum)
at 1/50 of the image per step; SIC and AIC PAIR's defaults (13 thresholds, entropy by lossless
WebP); PAIR skips an image whose prediction on the original is below ``min_pred_value`` (0.8),
so the number of photos each SIC/AIC mean covers is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default="out/demo")
    parser.add_argument("--min-pred", type=float, default=0.8, help="PAIR's min_pred_value for SIC/AIC")
    args = parser.parse_args(argv)
    import engine
    from engine.images import read_images
    from engine.methods.common import resolve_target

    demo = Path(args.demo)
    clf = engine.load(demo / "efficientnet_lite0.onnx")
    # the photos in the order the maps were computed (the explain record keeps it)
    with np.load(demo / "explain" / "saliency" / "maps.npz", allow_pickle=False) as z:
        paths = [im["path"] for im in json.loads(str(z["record"]))["images"]]
    x, _ = read_images(paths, clf.input_shape, clf.layout, clf.input_range)
    targets = resolve_target(clf, x, None)
    metrics = {
        "insertion": {"preset": "paper", "step": 1004},
        "deletion": {"preset": "paper", "step": 1004},
        "sic": {"min_pred_value": args.min_pred},
        "aic": {"min_pred_value": args.min_pred},
    }
    rows = []
    for folder in sorted((demo / "explain").iterdir()):
        if not (folder / "maps.npz").exists():
            continue
        with np.load(folder / "maps.npz", allow_pickle=False) as z:
            maps = z["attributions"]
            order = [im["path"] for im in json.loads(str(z["record"]))["images"]]
        if order != paths:
            raise SystemExit(f"{folder}: maps of other images than {paths}")
        row = {"method": folder.name}
        for metric, params in metrics.items():
            start = time.perf_counter()
            scores = [r.score for r in engine.evaluate(clf, x, maps, metric, target=targets, **params)]
            finite = [s for s in scores if np.isfinite(s)]
            row[metric] = (float(np.mean(finite)) if finite else float("nan"), len(finite))
            row[f"{metric} s"] = time.perf_counter() - start
        rows.append(row)
        print(folder.name, {k: v for k, v in row.items() if k != "method"}, flush=True)
    print("\n| method | insertion ↑ | deletion ↓ | SIC ↑ (photos) | AIC ↑ (photos) |\n|---|---|---|---|---|")
    for r in rows:
        sic, aic = r["sic"], r["aic"]
        print(
            f"| {r['method']} | {r['insertion'][0]:.3f} | {r['deletion'][0]:.3f} | "
            f"{sic[0]:.3f} ({sic[1]}) | {aic[0]:.3f} ({aic[1]}) |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
