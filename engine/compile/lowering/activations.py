"""Lowerings of the element-wise activation gradients and the softmax family (design/lowering.md)."""

from __future__ import annotations

import numpy as np

from ..graph import attrs
from .registry import lowering, make, reduction


@lowering("SigmoidGrad")
def sigmoid_grad(node, ctx):
    dy, y = node.input
    one_minus, dy_y = ctx.fresh("one_minus_y"), ctx.fresh("dy_y")
    return [
        make("Sub", [ctx.const(np.float32(1)), y], [one_minus]),
        make("Mul", [dy, y], [dy_y]),
        make("Mul", [dy_y, one_minus], node.output),
    ]


@lowering("TanhGrad")
def tanh_grad(node, ctx):
    dy, y = node.input
    y2, one_minus = ctx.fresh("y2"), ctx.fresh("one_minus_y2")
    return [
        make("Mul", [y, y], [y2]),
        make("Sub", [ctx.const(np.float32(1)), y2], [one_minus]),
        make("Mul", [dy, one_minus], node.output),
    ]


@lowering("LeakyReluGrad")
def leaky_relu_grad(node, ctx):
    dy, y = node.input
    alpha = attrs(node).get("alpha", 0.01)
    mask, scaled = ctx.fresh("leaky_mask"), ctx.fresh("leaky_scaled")
    return [
        make("Greater", [y, ctx.const(np.float32(0), "zero")], [mask]),
        make("Mul", [dy, ctx.const(np.float32(alpha))], [scaled]),
        make("Where", [mask, dy, scaled], node.output),
    ]


@lowering("SoftmaxGrad_13")
def softmax_grad(node, ctx):
    dy, y = node.input
    axis = attrs(node).get("axis", -1)
    prod, total, diff = ctx.fresh("dy_y"), ctx.fresh("sum_dy_y"), ctx.fresh("dy_minus")
    return [
        make("Mul", [dy, y], [prod]),
        reduction(ctx, "ReduceSum", prod, [axis], total),
        make("Sub", [dy, total], [diff]),
        make("Mul", [y, diff], node.output),
    ]


@lowering("LogSoftmaxGrad_13")
def log_softmax_grad(node, ctx):
    dy, y = node.input
    axis = attrs(node).get("axis", -1)
    total, p, scaled = ctx.fresh("sum_dy"), ctx.fresh("softmax"), ctx.fresh("p_sum")
    return [
        reduction(ctx, "ReduceSum", dy, [axis], total),
        make("Exp", [y], [p]),
        make("Mul", [p, total], [scaled]),
        make("Sub", [dy, scaled], node.output),
    ]
