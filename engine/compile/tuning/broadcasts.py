"""A broadcast of a pooled gradient back over the feature map as a nearest Resize.

GlobalAveragePool's backward (Expand of (N, C, 1, 1) to (N, C, H, W)) becomes a nearest Resize
with integer scales, which onnxruntime runs as an NCHWc Upsample: the activation mask after it
stays blocked instead of being reordered to NCHW and back. Exact: a copy.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ..graph import GraphContext
from .masks import scalar_value


def _is_scalar(ctx: GraphContext, shapes: dict, name: str) -> bool:
    """A one-element tensor: a constant, a recorded shape of one element, or a Cast of one."""
    if scalar_value(ctx, name) is not None or (name in shapes and shapes[name] in ([], [1])):
        return True
    node = ctx.producers.get(name)
    return node is not None and node.op_type == "Cast" and _is_scalar(ctx, shapes, node.input[0])


def _shape_of(ctx: GraphContext, shapes: dict, name: str):
    """The shape of ``name``, looking through a scaling by a scalar (GlobalAveragePool's backward
    divides by H*W before the Expand, and the builder records no shape for that tensor)."""
    while name not in shapes:
        node = ctx.producers.get(name)
        if node is None or node.op_type not in ("Div", "Mul") or not _is_scalar(ctx, shapes, node.input[1]):
            return None
        name = node.input[0]
    return shapes[name]


def upsample_broadcasts(model: onnx.ModelProto, shapes: dict, opset: int) -> int:
    """Expand (N, C, 1, 1) -> (N, C, H, W) as Resize(nearest, asymmetric, floor). Returns how many."""
    if opset < 13:
        return 0
    ctx = GraphContext(model, shapes)
    out, count = [], 0
    for node in model.graph.node:
        expand = node.op_type == "Expand" and node.domain in ("", "ai.onnx")
        src = _shape_of(ctx, shapes, node.input[0]) if expand else None
        dst = shapes.get(node.output[0]) if expand else None
        if (
            not src
            or not dst
            or len(src) != 4
            or len(dst) != 4
            or list(src[:2]) != list(dst[:2])
            or list(src[2:]) != [1, 1]
            or not all(isinstance(d, int) and d > 0 for d in dst[1:])
        ):
            out.append(node)
            continue
        # onnxruntime runs Resize as an NCHWc Upsample only when its input is already NCHWc: an
        # identity 1x1 depthwise Conv on the (N, C, 1, 1) tensor gets it there (exact, ~free).
        blocked = ctx.fresh("blocked")
        identity = ctx.const(np.ones((src[1], 1, 1, 1), np.float32), "identity_kernel")
        scales = ctx.const(np.array([1, 1, *dst[2:]], np.float32), "upsample_scales")
        out += [
            helper.make_node(
                "Conv", [node.input[0], identity], [blocked], name=node.name + "/nchwc", group=src[1]
            ),
            helper.make_node(
                "Resize",
                [blocked, "", scales],
                list(node.output),
                name=node.name,
                mode="nearest",
                coordinate_transformation_mode="asymmetric",
                nearest_mode="floor",
            ),
        ]
        count += 1
    if count:
        del model.graph.node[:]
        model.graph.node.extend(out)
        model.graph.initializer.extend(ctx.new_initializers)
    return count
