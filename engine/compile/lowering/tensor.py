"""Lowerings of the indexing and shape ops: GatherGrad, SliceGrad, BroadcastGradientArgs, and the
sum-to-shape reduction a broadcasting operand's gradient needs."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from ..graph import attrs
from .registry import lowering, make, reduction


@lowering("GatherGrad")
def gather_grad(node, ctx):
    """Scatter-add dY into zeros(shape) along ``axis``, as (pre, D, post) blocks."""
    shape, indices, dy = node.input
    axis = attrs(node).get("axis", 0)
    n = ctx.fresh
    rank_name, ax, pre_dims, dim, post_dims = n("rank"), n("axis"), n("pre"), n("dim"), n("post")
    pre, post, idx_flat, size_d, neg, idx_pos, idx_fixed = (
        n(k) for k in ("pre_size", "post_size", "idx_flat", "size_d", "neg", "idx_pos", "idx_fixed")
    )
    new_shape, new_idx_shape, idx3, idx_exp, dy3, zeros, scattered, target = (
        n(k) for k in ("shape3", "idx_shape", "idx3", "idx_exp", "dy3", "zeros", "scat", "target")
    )
    one = ctx.const(np.array([1], np.int64))
    int0 = ctx.const(np.array([0], np.int64))
    big = ctx.const(np.array([np.iinfo(np.int64).max], np.int64))
    nodes = [
        make("Shape", [shape], [rank_name]),
        # axis may be negative: normalise it against the rank at run time
        make("Add", [ctx.const(np.array([axis], np.int64)), rank_name], [ax + "_neg"]),
        make("Mod", [ax + "_neg", rank_name], [ax]),
        make("Slice", [shape, int0, ax], [pre_dims]),
        make("Add", [ax, one], [ax + "_1"]),
        make("Slice", [shape, ax, ax + "_1"], [dim]),
        make("Slice", [shape, ax + "_1", big], [post_dims]),
        make("Concat", [one, pre_dims], [pre + "_c"], axis=0),
        reduction(ctx, "ReduceProd", pre + "_c", [0], pre),
        make("Concat", [one, post_dims], [post + "_c"], axis=0),
        reduction(ctx, "ReduceProd", post + "_c", [0], post),
        make("Cast", [indices], [idx_flat + "_64"], to=TensorProto.INT64),
        make("Reshape", [idx_flat + "_64", ctx.const(np.array([-1], np.int64))], [idx_flat]),
        make("Less", [idx_flat, ctx.const(np.array(0, np.int64))], [neg]),
        make("Add", [idx_flat, dim], [idx_pos]),
        make("Where", [neg, idx_pos, idx_flat], [idx_fixed]),
        make("Concat", [pre, ctx.const(np.array([-1], np.int64)), post], [new_shape], axis=0),
        make("Concat", [one, ctx.const(np.array([-1], np.int64)), one], [new_idx_shape], axis=0),
        make("Reshape", [idx_fixed, new_idx_shape], [idx3]),
        make("Reshape", [dy, new_shape], [dy3]),
        make("Shape", [dy3], [target]),
        make("Expand", [idx3, target], [idx_exp]),
        make("Concat", [pre, dim, post], [zeros + "_shape"], axis=0),
        make(
            "ConstantOfShape",
            [zeros + "_shape"],
            [zeros],
            value=helper.make_tensor("z", TensorProto.FLOAT, [1], [0]),
        ),
        make("ScatterElements", [zeros, idx_exp, dy3], [scattered], axis=1, reduction="add"),
        make("Reshape", [scattered, shape], node.output),
    ]
    return nodes


@lowering("SliceGrad")
def slice_grad(node, ctx):
    """Put dY back into zeros(shape): slice a range tensor to find the target positions."""
    dy, shape, *slice_args = node.input
    n = ctx.fresh
    total, rng, grid, pos, zeros, dyf, scat = (
        n(k) for k in ("total", "range", "grid", "pos", "zeros", "dy_flat", "scat")
    )
    minus_one = ctx.const(np.array([-1], np.int64))
    return [
        reduction(ctx, "ReduceProd", shape, [0], total, keepdims=0),
        make("Range", [ctx.const(np.array(0, np.int64)), total, ctx.const(np.array(1, np.int64))], [rng]),
        make("Reshape", [rng, shape], [grid]),
        make("Slice", [grid, *slice_args], [pos + "_nd"]),
        make("Reshape", [pos + "_nd", minus_one], [pos]),
        make("Reshape", [total, minus_one], [total + "_1"]),
        make(
            "ConstantOfShape",
            [total + "_1"],
            [zeros],
            value=helper.make_tensor("z", TensorProto.FLOAT, [1], [0]),
        ),
        make("Reshape", [dy, minus_one], [dyf]),
        make("ScatterElements", [zeros, pos, dyf], [scat], axis=0, reduction="add"),
        make("Reshape", [scat, shape], node.output),
    ]


@lowering("BroadcastGradientArgs")
def broadcast_gradient_args(node, ctx):
    """Axes each operand was broadcast along: pad shapes with 1s to a common rank, then
    axes = NonZero(A' == 1 and B' != 1). Constant axes when the shapes decide them at compile
    time (a runtime such as OpenVINO needs reduction axes of static length)."""
    a_shape, b_shape = node.input
    static = _static_broadcast_axes(ctx, a_shape, b_shape)
    if static is not None:
        return [
            make("Constant", [], [out], value=numpy_helper.from_array(np.array(axes, np.int64)))
            for out, axes in zip(node.output, static)
            if out
        ]
    n = ctx.fresh
    ra, rb, r = n("rank_a"), n("rank_b"), n("rank")
    nodes = [make("Shape", [a_shape], [ra]), make("Shape", [b_shape], [rb]), make("Max", [ra, rb], [r])]
    padded = {}
    for name, rank, key in ((a_shape, ra, "a"), (b_shape, rb, "b")):
        pad, ones, p = n(f"pad_{key}"), n(f"ones_{key}"), n(f"padded_{key}")
        nodes += [
            make("Sub", [r, rank], [pad]),
            make(
                "ConstantOfShape", [pad], [ones], value=helper.make_tensor("one", TensorProto.INT64, [1], [1])
            ),
            make("Concat", [ones, name], [p], axis=0),
        ]
        padded[key] = p
    one = ctx.const(np.array(1, np.int64))
    for out, (mine, other) in zip(node.output, (("a", "b"), ("b", "a"))):
        if not out:
            continue
        is1, not1, both, nz = n("is1"), n("not1"), n("both"), n("nz")
        nodes += [
            make("Equal", [padded[mine], one], [is1]),
            make("Equal", [padded[other], one], [not1 + "_"]),
            make("Not", [not1 + "_"], [not1]),
            make("And", [is1, not1], [both]),
            make("NonZero", [both], [nz]),
            make("Reshape", [nz, ctx.const(np.array([-1], np.int64))], [out]),
        ]
    return nodes


def _static_broadcast_axes(ctx, a_shape: str, b_shape: str) -> tuple[list[int], list[int]] | None:
    """The axes of BroadcastGradientArgs from the static shapes of the tensors whose Shape it reads,
    or None when a symbolic dim leaves them open. An axis of size 1 against a symbolic dim is
    reduced: if the symbol is 1 at run time, summing over a size-1 axis changes nothing."""
    dims = []
    for name in (a_shape, b_shape):
        shape_node = ctx.producers.get(name)
        if shape_node is None or shape_node.op_type != "Shape":
            return None
        d = ctx.shapes.get(shape_node.input[0])
        if d is None:
            return None
        a = attrs(shape_node)  # Shape(start, end) slices the dims (opset 15)
        end = a.get("end")
        dims.append(list(d)[a.get("start", 0) : (len(d) if end is None else end)])
    r = max(len(dims[0]), len(dims[1]))
    da, db = ([1] * (r - len(d)) + d for d in dims)
    axes: tuple[list[int], list[int]] = ([], [])
    for i, (x, y) in enumerate(zip(da, db)):
        if x == y:  # equal ints or the same symbol: no broadcast
            continue
        if x == 1 or y == 1:
            axes[0 if x == 1 else 1].append(i)
        elif isinstance(x, int) and isinstance(y, int):
            return None  # incompatible: leave it to the runtime's own error
        else:
            return None  # a symbol against another dim: decided only at run time
    return axes


def _static_dims(ctx, name):
    dims = ctx.shapes.get(name)
    if dims is None or any(not isinstance(d, int) or d <= 0 for d in dims):
        return None
    return list(dims)


def sum_to_shape(ctx, t: str, like: str, full_like: str, out: str) -> list:
    """Sum ``t`` (broadcast to the shape of ``full_like``) back to the shape of ``like``: the
    reduction a broadcasting operand's gradient needs. Constant axes when both shapes are static,
    else the axes are found at run time as in BroadcastGradientArgs."""
    small, full = _static_dims(ctx, like), _static_dims(ctx, full_like)
    if small is not None and full is not None:
        padded = [1] * (len(full) - len(small)) + small
        axes = [i for i, (a, b) in enumerate(zip(padded, full)) if a == 1 and b != 1]
        if not axes and len(padded) == len(small):
            return [make("Identity", [t], [out])]
        nodes, cur = [], t
        if axes:
            cur = ctx.fresh("summed")
            nodes.append(
                make("ReduceSum", [t, ctx.const(np.array(axes, np.int64), "axes")], [cur], keepdims=1)
            )
        nodes.append(make("Reshape", [cur, ctx.const(np.array(small, np.int64), "shape")], [out]))
        return nodes
    n = ctx.fresh
    sl, sf, rl, rf, pad, ones, padded, is1, full1, not1, both, nz, axes, summed = (
        n(k)
        for k in (
            "shape_small",
            "shape_full",
            "rank_small",
            "rank_full",
            "pad",
            "ones",
            "padded",
            "is1",
            "full1",
            "not1",
            "both",
            "nz",
            "axes",
            "summed",
        )
    )
    one = ctx.const(np.array(1, np.int64))
    return [
        make("Shape", [like], [sl]),
        make("Shape", [t], [sf]),
        make("Size", [sl], [rl]),
        make("Size", [sf], [rf]),
        make("Sub", [rf, rl], [pad]),
        make("Reshape", [pad, ctx.const(np.array([1], np.int64))], [pad + "_1d"]),
        make(
            "ConstantOfShape",
            [pad + "_1d"],
            [ones],
            value=helper.make_tensor("one", TensorProto.INT64, [1], [1]),
        ),
        make("Concat", [ones, sl], [padded], axis=0),
        make("Equal", [padded, one], [is1]),
        make("Equal", [sf, one], [full1]),
        make("Not", [full1], [not1]),
        make("And", [is1, not1], [both]),
        make("NonZero", [both], [nz]),
        make("Reshape", [nz, ctx.const(np.array([-1], np.int64))], [axes]),
        make("ReduceSum", [t, axes], [summed], keepdims=1, noop_with_empty_axes=1),
        make("Reshape", [summed, sl], [out]),
    ]
