"""Self-describing result records: enough to reproduce a result from the record alone.

A record names the model (and gradient model) by sha256, the method with every parameter
including the defaults it ran with, the class explained and its label, the seed, the
preprocessing, how each image was decoded, the providers, and the versions of everything that
shapes the numbers (onnxplain, onnxruntime, onnx, numpy, Python).
"""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path
from typing import Any

import numpy as np


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    from .. import __version__

    return {
        "onnxplain": __version__,
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def jsonable(value: Any) -> Any:
    """Parameters as JSON: arrays become lists (small) or a digest (large)."""
    if isinstance(value, np.ndarray):
        if value.size <= 64:
            return value.tolist()
        return {
            "array": list(value.shape),
            "dtype": str(value.dtype),
            "sha256": hashlib.sha256(value.tobytes()).hexdigest(),
        }
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def method_record(
    clf: Any,
    method: str,
    params: dict,
    *,
    output: str,
    targets: np.ndarray,
    images: list[dict],
    seconds: float | None = None,
) -> dict:
    """The record of one method run over a batch of images (``images``: one dict per image)."""
    from ..methods import method_parameters

    full = {k: v for k, v in method_parameters(method).items() if k != "output"}
    full.update(params)
    labels = getattr(clf, "labels", None) or []
    return {
        "kind": "explanation",
        "model": str(getattr(clf, "path", "") or ""),
        "model_sha256": getattr(clf, "sha256", None),
        "gradient_model_sha256": getattr(clf, "gradient_model_sha256", None),
        "method": method,
        "params": jsonable(full),
        "params_given": jsonable(params),
        "seed": jsonable(full.get("seed")),
        "output": output,
        "targets": [
            {"class": int(t), "label": labels[int(t)] if int(t) < len(labels) else None} for t in targets
        ],
        "images": images,
        "preprocessing": jsonable(getattr(getattr(clf, "info", None), "preprocessing", {}) or {}),
        "layout": getattr(clf, "layout", None),
        "input_range": list(getattr(clf, "input_range", (0.0, 1.0))),
        "providers": getattr(clf, "providers", None),
        "notes": list(getattr(clf, "notes", []) or []),
        "seconds": seconds,
        "versions": versions(),
    }
