"""``onnxplain annotate``: what cannot be inferred about a foreign model, written into a copy.

The copy is the model as onnxplain explains it (engine/adapt.py's rewrites applied, external data
inline) plus onnxplain metadata: layout, input range, labels, and — when ``mean``/``std`` are given —
the normalisation baked in as ``Sub``/``Div`` nodes in front of the graph, so the copy's input is
the image in ``input_range`` (default [0, 1]) like every onnxplain export.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import helper, numpy_helper

from . import metadata
from .adapt import infer_layout
from .atomic import atomic_write_bytes, refuse_overwrite
from .errors import InputError
from .modelfile import read_model


def annotate(
    source: str | Path,
    output: str | Path,
    *,
    layout: str | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    input_range: tuple[float, float] | None = None,
    labels: list[str] | None = None,
) -> list[str]:
    """Write the annotated copy; returns what was done, one line per change."""
    mf = read_model(source)
    refuse_overwrite(output, [mf.path, *mf.data_files], option="-o")
    # A batch made dynamic is verified only by the runtime: the copy keeps the fixed batch, and is
    # adapted (and verified) again when it is loaded.
    model = mf.fixed_batch if mf.fixed_batch is not None else mf.model
    info = metadata.read(model)
    notes = [n for n in mf.notes if "batch axis" not in n]
    layout = layout or info.layout or infer_layout(mf.input_dims)[0]
    if layout not in ("NCHW", "NHWC"):
        raise InputError(f"{mf.where}: --layout is needed: {infer_layout(mf.input_dims)[1]}")
    info.layout = layout
    if input_range is not None:
        lo, hi = (float(v) for v in input_range)
        if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
            raise InputError(f"--range {lo} {hi}: LOW must be below HIGH")
        info.input_range = (lo, hi)
    elif info.input_range is None:
        info.input_range = mf.inferred_range or (0.0, 1.0)
    if labels is not None:
        if len(labels) != mf.num_classes:
            raise InputError(f"--labels: {len(labels)} labels for a model with {mf.num_classes} classes")
        info.labels = list(labels)
    if (mean is None) != (std is None):
        raise InputError("--mean and --std go together")
    if mean is not None:
        channels = mf.input_dims[1] if layout == "NCHW" else mf.input_dims[-1]
        m, s = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        if not isinstance(channels, int) or len(m) not in (1, channels) or len(s) not in (1, channels):
            raise InputError(f"--mean/--std: give 1 or {channels} values (the input has {channels} channels)")
        if (s <= 0).any() or not np.isfinite(s).all() or not np.isfinite(m).all():
            raise InputError("--std values must be positive and finite, --mean finite")
        _bake_normalisation(model, mf.input_name, m, s, layout, len(mf.input_dims))
        info.preprocessing = {"mean": m.tolist(), "std": s.tolist(), "baked": True}
        notes.append(f"normalisation (x - {m.tolist()}) / {s.tolist()} baked in front of the graph")
    metadata.write(model, info)
    data = model.SerializeToString()
    atomic_write_bytes(Path(output), data)
    notes.append(
        f"metadata: layout {layout}, input range {list(info.input_range)}"
        + (f", {len(info.labels)} labels" if info.labels else "")
    )
    return notes


def _bake_normalisation(model, name: str, mean: np.ndarray, std: np.ndarray, layout: str, rank: int) -> None:
    shape = [1] * rank
    shape[1 if layout == "NCHW" else rank - 1] = -1
    g = model.graph
    normalised = f"{name}__onnxplain_normalised"
    for n in g.node:
        for i, inp in enumerate(n.input):
            if inp == name:
                n.input[i] = normalised
    for o in g.output:
        if o.name == name:
            raise InputError(f"the input {name!r} is also an output; cannot bake normalisation")
    g.initializer.extend(
        [
            numpy_helper.from_array(mean.reshape(shape), f"{name}__onnxplain_mean"),
            numpy_helper.from_array(std.reshape(shape), f"{name}__onnxplain_std"),
        ]
    )
    nodes = [
        helper.make_node(
            "Sub",
            [name, f"{name}__onnxplain_mean"],
            [f"{name}__onnxplain_centred"],
            name="onnxplain_normalise_sub",
        ),
        helper.make_node(
            "Div",
            [f"{name}__onnxplain_centred", f"{name}__onnxplain_std"],
            [normalised],
            name="onnxplain_normalise_div",
        ),
    ]
    for node in reversed(nodes):
        g.node.insert(0, node)
