"""Model metadata written by the exporters and read back by the runtime.

Everything lives in ONNX ``metadata_props`` under the ``onnxplain.`` prefix, values JSON-encoded,
so a model exported with onnxplain needs no flags: layout, value range, labels and preprocessing
travel with the file.
"""

from __future__ import annotations

import json
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
        except json.JSONDecodeError as e:
            raise ValueError(f"metadata {p.key!r} is not valid JSON: {p.value[:80]!r}") from e
        if key in known:
            setattr(info, key, value)
        else:
            info.extra[key] = value
    if info.layout is not None and info.layout not in ("NCHW", "NHWC"):
        raise ValueError(f"metadata onnxplain.layout must be NCHW or NHWC, got {info.layout!r}")
    if info.input_range is not None:
        lo, hi = (float(v) for v in info.input_range)
        if not lo < hi:
            raise ValueError(f"metadata onnxplain.input_range must be (low, high), got {info.input_range}")
        info.input_range = (lo, hi)
    return info
