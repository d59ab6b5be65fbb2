"""Resize as matrix products (issue #9 §1: coat, hrnet; the builder emits ResizeGrad, which has no
kernel).

Resize is linear in its input and separable: along each resized axis of size n -> m, output
position j is a fixed combination of input positions, Y = A·X with an (m, n) matrix A, for every
mode (nearest, linear, cubic) and coordinate transformation (half_pixel, pytorch_half_pixel,
align_corners, asymmetric, ...). The prepass rewrites a Resize with static sizes into one MatMul per
resized axis with its A, which the builder differentiates (dX = Aᵀ·dY). A is not derived from the
formulas: it is read off the operator itself, onnxruntime's Resize applied to the n unit vectors
with the node's own attributes and that axis's scale or size, so every attribute means exactly what
it means to the runtime the model was written for. Nearest gives 0/1 matrices (the rewrite is
bit-exact); linear and cubic agree with the direct kernel to float32 rounding.

Refused with the reason: computed scales or sizes, dynamic input sizes, tf_crop_and_resize (affine,
not linear: it writes extrapolation_value), keep_aspect_ratio_policy other than stretch, and resizing
the batch or channel axis.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from ...errors import UnsupportedModelError
from ..graph import attrs

_SKIP = {"axes", "keep_aspect_ratio_policy"}


def _text(v):
    return v.decode() if isinstance(v, bytes) else v


def resize_matrix(node, opset: int, n: int, scale: float | None, size: int | None) -> np.ndarray:
    """The (m, n) matrix of ``node``'s Resize along one axis of size n, by running onnxruntime's
    Resize on the unit vectors: input (n, 1, n, 1) with X[i, 0, i, 0] = 1, resized along axis 2."""
    import onnxruntime as ort

    a = [x for x in node.attribute if x.name not in _SKIP]
    inputs = ["x", ""]
    inits = []
    if size is not None:
        inputs += ["", "sizes"]
        inits.append(helper.make_tensor("sizes", TensorProto.INT64, [4], [n, 1, size, 1]))
    else:
        inputs += ["scales"]
        inits.append(helper.make_tensor("scales", TensorProto.FLOAT, [4], [1.0, 1.0, scale, 1.0]))
    probe = helper.make_node("Resize", inputs, ["y"])
    probe.attribute.extend(a)
    graph = helper.make_graph(
        [probe],
        "resize_matrix",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, 1, n, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    eye = np.eye(n, dtype=np.float32).reshape(n, 1, n, 1)
    (y,) = sess.run(["y"], {"x": eye})
    return np.ascontiguousarray(y[:, 0, :, 0].T)  # y[i, 0, j, 0] = A[j, i]


def _resize(node, ctx, where):
    x, out = node.input[0], node.output[0]
    ins = list(node.input) + [""] * (4 - len(node.input))
    a = attrs(node)

    def refuse(why):
        return UnsupportedModelError(f"{where}: node {node.name!r} (Resize) cannot be differentiated: {why}")

    ctm = _text(a.get("coordinate_transformation_mode", "half_pixel"))
    if ctm == "tf_crop_and_resize":
        raise refuse("coordinate_transformation_mode tf_crop_and_resize is not supported")
    if _text(a.get("keep_aspect_ratio_policy", "stretch")) != "stretch":
        raise refuse("keep_aspect_ratio_policy other than stretch is not supported")
    dims = ctx.shapes.get(x)
    if dims is None:
        raise refuse(f"the rank of {x!r} is unknown")
    rank = len(dims)
    axes = [int(v) % rank for v in a.get("axes", range(rank))]
    scales = ctx.const_value(ins[2]) if ins[2] else None
    sizes = ctx.const_value(ins[3]) if ins[3] else None
    if ins[2] and scales is None:
        raise refuse("its scales are computed in the graph; export with fixed scales or sizes")
    if ins[3] and sizes is None:  # computed sizes (torch: Concat(Shape(x)[:2], size)): inferred ones
        sizes = _copied_sizes(ctx, ins[3], x)
        if sizes is None:
            raise refuse("its sizes are computed in the graph; export with a fixed output size")
    if scales is not None and scales.size == 0:
        scales = None
    if scales is None and (sizes is None or sizes.size == 0):
        raise refuse("it has neither scales nor sizes")
    factor = {ax: float(s) for ax, s in zip(axes, scales.reshape(-1))} if scales is not None else {}
    target = {ax: int(s) for ax, s in zip(axes, sizes.reshape(-1))} if scales is None else {}
    work = []
    for ax in axes:
        n = dims[ax]
        want = target.get(ax)
        if factor.get(ax) == 1.0 or want == -1 or (isinstance(n, int) and want == n):
            continue
        if ax < 2:
            raise refuse("it resizes the batch or channel axis")
        if not isinstance(n, int) or n <= 0:
            raise refuse(f"dimension {ax} of {x!r} is not static; export with a fixed input size")
        work.append((ax, resize_matrix(node, ctx.opset, n, factor.get(ax), target.get(ax))))
    if not work:
        return [helper.make_node("Identity", [x], [out])]
    nodes, cur = [], x
    for k, (ax, mat) in enumerate(work):
        dst = out if k == len(work) - 1 else ctx.fresh("resized")
        if ax == rank - 1:
            nodes.append(helper.make_node("MatMul", [cur, ctx.const(mat.T.copy(), "resize_matrix")], [dst]))
        elif ax == rank - 2:
            nodes.append(helper.make_node("MatMul", [ctx.const(mat, "resize_matrix"), cur], [dst]))
        else:
            perm = list(range(rank))
            perm[ax], perm[-1] = perm[-1], perm[ax]
            t, mm = ctx.fresh("resize_t"), ctx.fresh("resize_mm")
            nodes += [
                helper.make_node("Transpose", [cur], [t], perm=perm),
                helper.make_node("MatMul", [t, ctx.const(mat.T.copy(), "resize_matrix")], [mm]),
                helper.make_node("Transpose", [mm], [dst], perm=perm),
            ]
        cur = dst
    return nodes


def _copied_sizes(ctx, sizes: str, x: str) -> np.ndarray | None:
    """Sizes computed as torch writes them, Concat(Slice(Shape(x), 0, k), constant sizes): the
    copied leading dims are returned as -1 (unchanged), the rest as the constants."""
    concat = ctx.producers.get(sizes)
    if concat is None or concat.op_type != "Concat":
        return None
    out: list[int] = []
    for part in concat.input:
        value = ctx.const_value(part)
        if value is not None:
            out += [int(v) for v in value.reshape(-1)]
            continue
        sl = ctx.producers.get(part)
        if sl is None or sl.op_type != "Slice" or len(sl.input) < 3:
            return None
        shape = ctx.producers.get(sl.input[0])
        start, stop = (ctx.const_value(i) for i in sl.input[1:3])
        if shape is None or shape.op_type != "Shape" or shape.input[0] != x or start is None or stop is None:
            return None
        start, stop = int(start.reshape(-1)[0]), int(stop.reshape(-1)[0])
        extra = [ctx.const_value(i) for i in sl.input[3:5] if i]  # axes [0], steps [1] if given
        if (
            start != len(out)
            or attrs(shape).get("start", 0) != 0
            or any(v is None or v.reshape(-1).tolist() not in ([0], [1]) for v in extra)
        ):
            return None
        out += [-1] * (min(stop, len(ctx.shapes.get(x) or [])) - start)
    return np.array(out, np.int64)


REWRITES = {"Resize": _resize}
