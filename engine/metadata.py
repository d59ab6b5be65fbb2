"""Model metadata written by the exporters and read back by the runtime.

Everything lives in ONNX ``metadata_props`` under the ``onnxplain.`` prefix, values JSON-encoded,
so a model exported with onnxplain needs no flags: layout, value range, labels and preprocessing
travel with the file.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import onnx

PREFIX = "onnxplain."


@dataclass
class ModelInfo:
    """What the runtime needs to know about a classifier beyond its graph."""

    layout: str | None = None  # "NCHW", "NHWC" or None (not an image model: MLP, text)
    input_range: tuple[float, float] | None = None  # value range of the ONNX input, e.g. (0, 1)
    labels: list[str] | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)  # e.g. {"mean": [...], "std": [...]}
    source_framework: str | None = None  # "torch", "keras"
    source_framework_version: str | None = None
    export_max_abs_diff: float | None = None  # measured logit difference vs the framework
    extra: dict[str, Any] = field(default_factory=dict)

    def to_props(self) -> dict[str, str]:
        d = asdict(self)
        extra = d.pop("extra")
        d.update(extra)
        return {PREFIX + k: json.dumps(v) for k, v in d.items() if v is not None and v != {}}


def write(model: onnx.ModelProto, info: ModelInfo) -> None:
    """Replace the onnxplain metadata of ``model`` in place."""
    keep = [p for p in model.metadata_props if not p.key.startswith(PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for k, v in info.to_props().items():
        model.metadata_props.add(key=k, value=v)


def read(model: onnx.ModelProto) -> ModelInfo:
    """Read onnxplain metadata; unknown keys land in ``extra``; malformed values raise ValueError."""
    info = ModelInfo()
    known = set(ModelInfo.__dataclass_fields__) - {"extra"}
    for p in model.metadata_props:
        if not p.key.startswith(PREFIX):
            continue
        key = p.key[len(PREFIX) :]
        try:
            value = json.loads(p.value)
        except (json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"metadata {p.key[:80]!r} is not valid JSON: {p.value[:80]!r}") from e
        if key in known:
            setattr(info, key, value)
        else:
            info.extra[key] = value
    if info.layout is not None and info.layout not in ("NCHW", "NHWC"):
        raise ValueError(f"metadata onnxplain.layout must be NCHW or NHWC, got {str(info.layout)[:40]!r}")
    if info.input_range is not None:
        r = info.input_range
        ok = isinstance(r, (list, tuple)) and len(r) == 2 and all(_is_number(v) for v in r)
        if not ok or not float(r[0]) < float(r[1]):
            raise ValueError(f"metadata onnxplain.input_range must be [low, high] numbers, got {str(r)[:60]}")
        info.input_range = (float(r[0]), float(r[1]))
    if info.labels is not None and (
        not isinstance(info.labels, list) or not all(isinstance(v, str) for v in info.labels)
    ):
        raise ValueError("metadata onnxplain.labels must be a JSON list of strings")
    if not isinstance(info.preprocessing, dict):
        raise ValueError("metadata onnxplain.preprocessing must be a JSON object")
    for key in ("mean", "std"):
        v = info.preprocessing.get(key)
        if v is not None and not (isinstance(v, list) and all(_is_number(e) for e in v)):
            raise ValueError(f"metadata onnxplain.preprocessing.{key} must be a list of numbers")
    return info


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
