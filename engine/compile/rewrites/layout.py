"""DepthToSpace / SpaceToDepth (pixel shuffle; no builder gradient) as Reshape/Transpose/Reshape."""

from __future__ import annotations

import numpy as np
from onnx import helper

from ...errors import UnsupportedModelError
from ..graph import attrs
from .registry import rewrite


@rewrite("DepthToSpace")
@rewrite("SpaceToDepth")
def _depth_space(node, ctx, where):
    """DepthToSpace / SpaceToDepth (pixel shuffle; no builder gradient) as the Reshape -> Transpose ->
    Reshape of their ONNX definition; the batch stays symbolic (0 in the shapes copies it), the
    other dims must be static."""
    x = node.input[0]
    a = attrs(node)
    bs = a["blocksize"]
    dims = ctx.shapes.get(x)
    if dims is None or len(dims) != 4 or any(not isinstance(d, int) or d <= 0 for d in dims[1:]):
        raise UnsupportedModelError(
            f"{where}: node {node.name!r} ({node.op_type}) needs static channel and spatial sizes of {x!r}; "
            "export with a fixed input size"
        )
    _, c, h, w = dims
    if node.op_type == "DepthToSpace":
        mode = a.get("mode", b"DCR")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode == "DCR":
            first, perm = [0, bs, bs, c // (bs * bs), h, w], [0, 3, 4, 1, 5, 2]
        else:  # CRD
            first, perm = [0, c // (bs * bs), bs, bs, h, w], [0, 1, 4, 2, 5, 3]
        last = [0, c // (bs * bs), h * bs, w * bs]
    else:
        first, perm = [0, c, h // bs, bs, w // bs, bs], [0, 3, 5, 1, 2, 4]
        last = [0, c * bs * bs, h // bs, w // bs]
    r1, t = ctx.fresh("d2s_split"), ctx.fresh("d2s_perm")
    return [
        helper.make_node("Reshape", [x, ctx.const(np.array(first, np.int64), "shape")], [r1]),
        helper.make_node("Transpose", [r1], [t], perm=perm),
        helper.make_node("Reshape", [t, ctx.const(np.array(last, np.int64), "shape")], [node.output[0]]),
    ]
