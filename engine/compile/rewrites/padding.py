"""reflect, edge and wrap Pad (no builder gradient) as Gathers with constant indices."""

from __future__ import annotations

import numpy as np
from onnx import helper

from ...errors import UnsupportedModelError
from ..graph import attrs
from .registry import rewrite


@rewrite("Pad")
def _pad(node, ctx, where):
    """Constant padding is left to the builder. reflect, edge and wrap padding (no gradient in the
    builder) become one Gather per padded axis with constant indices: np.pad of arange(n) in the
    same mode gives, for every output position, the input position it copies (numpy's modes are
    the ONNX ones; torch's reflect, replicate and circular). Gather's gradient scatter-adds, so an
    input copied several times gets each copy's gradient."""
    mode = attrs(node).get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode == "constant":
        return [node]
    x = node.input[0]
    pads = ctx.const_value(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    dims = ctx.shapes.get(x)
    refuse = lambda why: UnsupportedModelError(  # noqa: E731
        f"{where}: node {node.name!r} (Pad, mode={mode}) cannot be differentiated: {why}"
    )
    if pads is None:
        raise refuse("its pads are computed from the input; export with constant padding")
    if dims is None:
        raise refuse(f"the rank of {x!r} is unknown")
    rank = len(dims)
    axes = list(range(rank))
    if len(node.input) > 3 and node.input[3]:
        given = ctx.const_value(node.input[3])
        if given is None:
            raise refuse("its axes are not constant")
        axes = [int(a) % rank for a in given]
    pads = [int(p) for p in pads]
    begins, ends = pads[: len(axes)], pads[len(axes) :]
    if any(p < 0 for p in pads):
        raise refuse(f"negative pads {pads} (cropping) in {mode} mode")
    numpy_mode = {"reflect": "reflect", "edge": "edge", "wrap": "wrap"}.get(mode)
    if numpy_mode is None:
        raise refuse(f"unknown mode {mode!r}")
    nodes, cur = [], x
    padded = [(a, b, e) for a, b, e in zip(axes, begins, ends) if b or e]
    for k, (axis, b, e) in enumerate(padded):
        n = dims[axis]
        if not isinstance(n, int) or n <= 0:
            raise refuse(f"dimension {axis} of {x!r} is not static; export with a fixed input size")
        if mode == "reflect" and max(b, e) >= n:
            raise refuse(f"reflect pads {b, e} on a dimension of size {n}")
        index = np.pad(np.arange(n, dtype=np.int64), (b, e), mode=numpy_mode)
        out = node.output[0] if k == len(padded) - 1 else ctx.fresh("padded")
        nodes.append(helper.make_node("Gather", [cur, ctx.const(index, "pad_index")], [out], axis=axis))
        cur = out
    if not nodes:
        return [helper.make_node("Identity", [x], [node.output[0]], name=node.name)]
    return nodes
