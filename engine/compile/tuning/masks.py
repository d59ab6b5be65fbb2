"""Activation masks as 1x1 depthwise Convs with fused activations (onnxruntime's NCHWc kernels).

The mask of a ReLU / ReLU6 backward pass, Cast(Greater(Y, lo) and Less(Y, hi)), becomes
Clip(Y·B − lo·B, 0, 1) for one bound and, for two, HardSigmoid(Conv(Y) + Clip(Conv(Y)))
(``_two_sided_mask``), which onnxruntime runs as two NCHWc Convs (the second with a fused Sum
input and activation) and no Mul; B is a power of two. Convs keep onnxruntime's blocked NCHWc
layout through the backward pass, where comparisons and Cast force a layout reorder around every
convolution. Exact: Y is the Clip output, so Y − lo and hi − Y are >= 0 and scaled by powers of
two; the mask is 1 unless Y equals a bound (0 then), or lies within 2^-101 above lo (2^-120 for
one bound).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..graph import GraphContext, attrs

_MAX_EXPONENT = 120  # B = 2^k with |bound| · B finite in float32 (< 2^128)


def scalar_value(ctx: GraphContext, name: str) -> float | None:
    value = ctx.const_value(name)
    if value is None or value.size != 1:
        return None
    return float(value.reshape(()))


def _mask_bounds(ctx, cast) -> tuple[str, float, float] | None:
    """(Y, lo, hi) when ``cast`` is Cast(Greater(Y, lo)) or Cast(And(Greater(Y, lo), Less(Y, hi)))."""
    if cast.op_type != "Cast" or attrs(cast).get("to") != TensorProto.FLOAT:
        return None
    src = ctx.producers.get(cast.input[0])
    if src is None:
        return None
    if src.op_type == "Greater":
        lo = scalar_value(ctx, src.input[1])
        return None if lo is None else (src.input[0], lo, math.inf)
    if src.op_type != "And":
        return None
    gt, lt = (ctx.producers.get(i) for i in src.input)
    if gt is None or lt is None or gt.op_type != "Greater" or lt.op_type != "Less":
        return None
    if gt.input[0] != lt.input[0]:
        return None
    lo, hi = scalar_value(ctx, gt.input[1]), scalar_value(ctx, lt.input[1])
    if lo is None or hi is None:
        return None
    return gt.input[0], lo, hi


def _clipped_to(ctx: GraphContext, y: str, lo: float, hi: float) -> bool:
    """Whether ``y`` is the output of a Clip to exactly [lo, hi], so that lo <= y <= hi: the
    HardSigmoid mask relies on it (the two-factor form is exact for any y)."""
    clip = ctx.producers.get(y)
    if clip is None or clip.op_type != "Clip" or len(clip.input) < 3:
        return False
    bounds = [scalar_value(ctx, name) if name else None for name in clip.input[1:3]]
    return bounds == [np.float32(lo), np.float32(hi)]


def _two_sided_mask(ctx: GraphContext, y: str, c: int, lo: float, hi: float, out: str) -> list | None:
    """1[lo < Y < hi] for Y = Clip(·, lo, hi) in two 1x1 depthwise Convs and no Mul:

        top  = Clip(−2^(a+s) · (Y − pred(hi)), −2^s, 0)      (−2^s where Y == hi, else 0)
        mask = HardSigmoid(2^k · (Y − lo) + top)             (alpha 1, beta 0: Clip to [0, 1])

    onnxruntime fuses the Add into the second Conv as its Sum input and the HardSigmoid as its
    activation, so the mask costs two passes over Y instead of two Convs and a Mul. pred(hi) is
    the float32 just below hi and 2^a = 1/(hi − pred(hi)), so 2^a·(Y − pred(hi)) is ≥ 1 at hi
    and ≤ 0 below it (Sterbenz: exact); every constant is a power-of-two multiple of a float32,
    so each product is exact. The mask is exact unless 0 < Y − lo < 2^-k (k = 101 for ReLU6).
    None when the exponents do not fit float32 (then the two-factor form is used)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return None
    hi32 = np.float32(hi)
    pred = np.nextafter(hi32, np.float32(-np.inf))
    a = -math.log2(float(hi32) - float(pred))
    reach = max(abs(lo), abs(hi), hi - lo)
    s = math.floor(127.99 - math.log2(reach) - a)
    k = math.floor(s - math.log2(hi - lo))
    if not a.is_integer() or k < 100 or 2.0**k * (hi - lo) > 2.0**s:
        return None
    a = int(a)
    consts = {
        "w_top": np.float32(-(2.0 ** (a + s))),
        "b_top": np.float32(2.0 ** (a + s) * float(pred)),
        "top_floor": np.float32(-(2.0**s)),
        "w_mask": np.float32(2.0**k),
        "b_mask": np.float32(-(2.0**k) * lo),
    }
    if not all(np.isfinite(v) for v in consts.values()):
        return None
    zero = ctx.const(np.float32(0), "zero")
    w_top = ctx.const(np.full((c, 1, 1, 1), consts["w_top"], np.float32), "mask_w")
    b_top = ctx.const(np.full((c,), consts["b_top"], np.float32), "mask_b")
    w_mask = ctx.const(np.full((c, 1, 1, 1), consts["w_mask"], np.float32), "mask_w")
    b_mask = ctx.const(np.full((c,), consts["b_mask"], np.float32), "mask_b")
    pre_top, top, pre, summed = (ctx.fresh(h) for h in ("mask_top_pre", "mask_top", "mask_pre", "mask_sum"))
    return [
        helper.make_node("Conv", [y, w_top, b_top], [pre_top], group=c, kernel_shape=[1, 1]),
        helper.make_node("Clip", [pre_top, ctx.const(consts["top_floor"], "top_floor"), zero], [top]),
        helper.make_node("Conv", [y, w_mask, b_mask], [pre], group=c, kernel_shape=[1, 1]),
        helper.make_node("Add", [pre, top], [summed]),
        helper.make_node("HardSigmoid", [summed], [out], alpha=1.0, beta=0.0),
    ]


def _factor_mask(ctx: GraphContext, y: str, c: int, lo: float, hi: float, out: str) -> list:
    """1[lo < Y < hi] as a product of Clip(±B·(Y − bound), 0, 1) factors, one per finite bound:
    exact for any Y (the module docstring)."""
    finite = [abs(b) for b in (lo, hi) if math.isfinite(b)]
    scale = 2.0 ** (_MAX_EXPONENT - max(0, math.ceil(math.log2(max(finite + [1.0])))))
    zero, one = ctx.const(np.float32(0), "zero"), ctx.const(np.float32(1), "one")
    factors, nodes = [], []
    for sign, bound in ((1.0, lo), (-1.0, hi)):
        if not math.isfinite(bound):
            continue
        w = ctx.const(np.full((c, 1, 1, 1), sign * scale, np.float32), "mask_w")
        b = ctx.const(np.full((c,), -sign * bound * scale, np.float32), "mask_b")
        pre, f = ctx.fresh("mask_pre"), ctx.fresh("mask_factor")
        nodes += [
            helper.make_node("Conv", [y, w, b], [pre], group=c, kernel_shape=[1, 1]),
            helper.make_node("Clip", [pre, zero, one], [f]),
        ]
        factors.append(f)
    if len(factors) == 1:
        nodes[-1].output[0] = out
    else:
        nodes.append(helper.make_node("Mul", factors, [out]))
    return nodes


def conv_masks(model: onnx.ModelProto, shapes: dict) -> int:
    """Rewrite activation masks of 4-D feature maps as Conv masks. Returns how many."""
    ctx = GraphContext(model, shapes)
    replaced: dict[str, list] = {}
    for node in model.graph.node:
        found = _mask_bounds(ctx, node)
        if found is None:
            continue
        y, lo, hi = found
        dims = shapes.get(y)
        if not dims or len(dims) != 4 or not isinstance(dims[1], int) or dims[1] <= 0:
            continue
        args = (ctx, y, dims[1], lo, hi, node.output[0])
        nodes = (_two_sided_mask(*args) if _clipped_to(ctx, y, lo, hi) else None) or _factor_mask(*args)
        for i, n in enumerate(nodes):
            n.name = f"{node.name}/conv_mask_{i}"
        replaced[node.name] = nodes
    if not replaced:
        return 0
    out = []
    for node in model.graph.node:
        out.extend(replaced.get(node.name, [node]) if node.name else [node])
    del model.graph.node[:]
    model.graph.node.extend(out)
    model.graph.initializer.extend(ctx.new_initializers)
    return len(replaced)
