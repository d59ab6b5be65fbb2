"""Prepass rewrites of reductions and scans the builder cannot differentiate (issue #9 §1).

onnxruntime-training 1.19.2 has no gradient for ReduceProd, CumSum, ReduceSumSquare, ReduceLogSum,
Sum and Mean (the variadic ops), and its ReduceL2 and ReduceLogSumExp gradients build invalid
graphs below opset 18 (an Unsqueeze with the opset-11 signature). Each is rewritten into ops it
differentiates; integer tensors (shape arithmetic) are left alone. Where a rewrite needs a static
size or constant axes that the graph does not give, the node is left as it is and the builder
names it if its gradient is needed.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, shape_inference

from ...errors import UnsupportedModelError
from ..graph import attrs


def _float_tensors(ctx) -> set[str]:
    """Names of the float tensors of the graph (inferred once per graph, kept on ctx)."""
    if not hasattr(ctx, "_float_tensors"):
        try:
            inferred = shape_inference.infer_shapes(ctx.model, strict_mode=False)
        except Exception:
            inferred = ctx.model
        g = inferred.graph
        floats = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
        ctx._float_tensors = {
            v.name for v in (*g.input, *g.value_info, *g.output) if v.type.tensor_type.elem_type in floats
        } | {i.name for i in g.initializer if i.data_type in floats}
    return ctx._float_tensors


def _is_float(ctx, name) -> bool:
    return name in _float_tensors(ctx)


def _axes(node, ctx) -> tuple[list[int] | None, int, int] | None:
    """(axes normalised to the rank or None for all axes, keepdims, noop_with_empty_axes); None
    when the axes are computed or the rank is unknown."""
    a = attrs(node)
    rank = ctx.rank(node.input[0])
    if "axes" in a:
        axes = list(a["axes"])
    elif len(node.input) > 1 and node.input[1]:
        value = ctx.const_value(node.input[1])
        if value is None:
            return None
        axes = [int(v) for v in np.atleast_1d(value)]
    else:
        axes = []
    if rank is None:
        return None
    keepdims, noop = a.get("keepdims", 1), a.get("noop_with_empty_axes", 0)
    if not axes:
        return (None if not noop else []), keepdims, noop
    return sorted({int(v) % rank for v in axes}), keepdims, noop


def _finish(ctx, reduced: str, axes, out: str, keepdims: int) -> list:
    """``reduced`` has keepdims=1: squeeze the reduced axes when the node drops them."""
    if keepdims:
        return [helper.make_node("Identity", [reduced], [out])]
    return [helper.make_node("Squeeze", [reduced, ctx.const(np.array(axes, np.int64), "axes")], [out])]


def _all_axes(ctx, x, axes):
    return list(range(ctx.rank(x))) if axes is None else axes


def _reduce_prod(node, ctx, where):
    """Product along each reduced axis as a balanced tree of Muls of halves (Split keeps the
    axis): the builder differentiates Mul exactly, zeros included (torch's prod backward), where
    prod / x would divide by zero. Needs the reduced sizes to be static."""
    x, out = node.input[0], node.output[0]
    got = _axes(node, ctx)
    dims = ctx.shapes.get(x)
    if not _is_float(ctx, x) or got is None or dims is None:
        return [node]
    axes, keepdims, _ = got
    if axes == []:  # noop_with_empty_axes
        return [helper.make_node("Identity", [x], [out])]
    axes = _all_axes(ctx, x, axes)
    if any(not isinstance(dims[a], int) or dims[a] <= 0 for a in axes):
        return [node]
    f = ctx.fresh
    nodes, cur = [], x
    for axis in axes:
        n, rest = dims[axis], []
        while n > 1:
            # one Split, not Slices: onnxruntime 1.19's GatherSliceToSplitFusion gives two fused
            # Splits the same name, and the builder's runtime then refuses the self-check graph
            h = n // 2
            lo, hi = f("prod_lo"), f("prod_hi")
            outs = [lo, hi] + ([f("prod_rest")] if n % 2 else [])
            split = ctx.const(np.array([h, h] + ([1] if n % 2 else []), np.int64), "split")
            nodes.append(helper.make_node("Split", [cur, split], outs, axis=axis))
            rest += outs[2:]
            cur = f("prod_half")
            nodes.append(helper.make_node("Mul", [lo, hi], [cur]))
            n = h
        for r in rest:
            nxt = f("prod_rest_mul")
            nodes.append(helper.make_node("Mul", [cur, r], [nxt]))
            cur = nxt
    return nodes + _finish(ctx, cur, axes, out, keepdims)


def _cumsum(node, ctx, where):
    """CumSum along a static axis of size n as a MatMul with the (n, n) 0/1 triangle: T[i, j] = 1
    where input i contributes to output j (i <= j; i < j when exclusive; mirrored when reverse).
    The gradient is the MatMul with the transposed triangle, a reverse cumulative sum."""
    x, axis_name = node.input[:2]
    axis = ctx.const_value(axis_name)
    dims = ctx.shapes.get(x)
    if not _is_float(ctx, x) or axis is None or dims is None:
        return [node]
    rank = len(dims)
    axis = int(np.asarray(axis).reshape(-1)[0]) % rank
    n = dims[axis]
    if not isinstance(n, int) or n <= 0:
        return [node]
    a = attrs(node)
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    if a.get("reverse", 0):
        tri = i > j if a.get("exclusive", 0) else i >= j
    else:
        tri = i < j if a.get("exclusive", 0) else i <= j
    t = ctx.const(tri.astype(np.float32), "cumsum_triangle")
    out = node.output[0]
    if axis == rank - 1:
        return [helper.make_node("MatMul", [x, t], [out])]
    perm = list(range(rank))
    perm[axis], perm[-1] = perm[-1], perm[axis]
    xt, yt = ctx.fresh("cumsum_t"), ctx.fresh("cumsum_mm")
    return [
        helper.make_node("Transpose", [x], [xt], perm=perm),
        helper.make_node("MatMul", [xt, t], [yt]),
        helper.make_node("Transpose", [yt], [out], perm=perm),  # the swap is its own inverse
    ]


def _sum_inputs(ctx, inputs, out):
    if len(inputs) == 1:
        return [helper.make_node("Identity", [inputs[0]], [out])]
    nodes, cur = [], inputs[0]
    for k, other in enumerate(inputs[1:]):
        nxt = out if k == len(inputs) - 2 else ctx.fresh("sum")
        nodes.append(helper.make_node("Add", [cur, other], [nxt]))
        cur = nxt
    return nodes


def _sum(node, ctx, where):
    """Variadic Sum as a chain of (broadcasting) Adds."""
    if not _is_float(ctx, node.input[0]):
        return [node]
    return _sum_inputs(ctx, list(node.input), node.output[0])


def _mean(node, ctx, where):
    """Variadic Mean: the Adds of Sum, times 1/n."""
    if not _is_float(ctx, node.input[0]):
        return [node]
    total = ctx.fresh("mean_sum")
    scale = ctx.const(np.float32(1.0 / len(node.input)), "mean_scale")
    return _sum_inputs(ctx, list(node.input), total) + [
        helper.make_node("Mul", [total, scale], [node.output[0]])
    ]


def _reduce_sum_of(ctx, node, src, out, keepdims=None):
    """ReduceSum of ``src`` with ``node``'s axes (an input from opset 13, as ReduceSum takes them)."""
    a = attrs(node)
    kw = {k: a[k] for k in ("keepdims", "noop_with_empty_axes") if k in a}
    if keepdims is not None:
        kw["keepdims"] = keepdims
    axes_inputs = list(node.input[1:2])
    if "axes" in a:
        axes_inputs = [ctx.const(np.array(a["axes"], np.int64), "axes")]
    return helper.make_node("ReduceSum", [src, *axes_inputs], [out], **kw)


def _reduce_sum_square(node, ctx, where):
    """ReduceSumSquare = ReduceSum(x·x)."""
    sq = ctx.fresh("square")
    return [
        helper.make_node("Mul", [node.input[0], node.input[0]], [sq]),
        _reduce_sum_of(ctx, node, sq, node.output[0]),
    ]


def _reduce_log_sum(node, ctx, where):
    """ReduceLogSum = Log(ReduceSum(x))."""
    s = ctx.fresh("sum")
    return [_reduce_sum_of(ctx, node, node.input[0], s), helper.make_node("Log", [s], [node.output[0]])]


def _reduce_l2(node, ctx, where):
    """ReduceL2 = sqrt(ReduceSum(x·x)) (the builder's own gradient fails below opset 18). A zero
    norm gets gradient 0, as torch's norm backward gives: the square root only ever sees s > 0
    (Where(s > 0, s, 1)), so no 0 · ∞ appears."""
    if ctx.opset >= 18:
        return [node]
    f = ctx.fresh
    sq, s, pos, safe, root = f("square"), f("sumsq"), f("positive"), f("safe"), f("root")
    zero = ctx.const(np.float32(0), "zero")
    return [
        helper.make_node("Mul", [node.input[0], node.input[0]], [sq]),
        _reduce_sum_of(ctx, node, sq, s),
        helper.make_node("Greater", [s, zero], [pos]),
        helper.make_node("Where", [pos, s, ctx.const(np.float32(1), "one")], [safe]),
        helper.make_node("Sqrt", [safe], [root]),
        helper.make_node("Where", [pos, root, zero], [node.output[0]]),
    ]


def _reduce_log_sum_exp(node, ctx, where):
    """ReduceLogSumExp = m + log(ReduceSum(exp(x − m))), m = ReduceMax(x) (rewritten as the
    prepass rewrites ReduceMax); the gradient through m is (1 − Σ softmax) = 0 up to rounding, so
    the result is softmax(x), as torch's logsumexp backward (the builder's own fails below 18)."""
    if ctx.opset >= 18:
        return [node]
    from .reductions import _reduce_max

    f = ctx.fresh
    m, d, e, s, log, summed = f("lse_max"), f("lse_d"), f("lse_exp"), f("lse_sum"), f("lse_log"), f("lse")
    max_node = helper.make_node("ReduceMax", list(node.input), [m], name=node.name + "/max")
    max_node.attribute.extend(a for a in node.attribute if a.name != "keepdims")
    max_node.attribute.append(helper.make_attribute("keepdims", 1))
    nodes = _reduce_max(max_node, ctx, where)
    nodes += [
        helper.make_node("Sub", [node.input[0], m], [d]),
        helper.make_node("Exp", [d], [e]),
        _reduce_sum_of(ctx, node, e, s, keepdims=1),
        helper.make_node("Log", [s], [log]),
        helper.make_node("Add", [log, m], [summed]),
    ]
    if attrs(node).get("keepdims", 1):
        return nodes + [helper.make_node("Identity", [summed], [node.output[0]])]
    got = _axes(node, ctx)
    if got is None:
        raise UnsupportedModelError(
            f"{where}: node {node.name!r} (ReduceLogSumExp) has computed axes or an unknown rank"
        )
    return nodes + _finish(ctx, summed, _all_axes(ctx, node.input[0], got[0]), node.output[0], 0)


def _mod(node, ctx, where):
    """Mod: dL/dX = dL/dY (registered in the builder, engine/compile/unary_gradients.py); the gradient
    for the divisor is not, so a divisor computed from the input is refused."""
    if _is_float(ctx, node.input[0]) and ctx.const_value(node.input[1]) is None:
        raise UnsupportedModelError(
            f"{where}: node {node.name!r} (Mod) divides by a computed tensor; only a constant "
            "divisor can be differentiated"
        )
    return [node]


REWRITES = {
    "ReduceProd": _reduce_prod,
    "CumSum": _cumsum,
    "Sum": _sum,
    "Mean": _mean,
    "ReduceSumSquare": _reduce_sum_square,
    "ReduceLogSum": _reduce_log_sum,
    "ReduceL2": _reduce_l2,
    "ReduceLogSumExp": _reduce_log_sum_exp,
    "Mod": _mod,
}
