"""Activations the builder cannot differentiate (or differentiates wrongly), rewritten into ops it
does: Gelu, Sign, Elu, HardSigmoid, HardSwish, Clip (explicit bounds), Softplus, Softsign, Mish,
Selu, Celu, ThresholdedRelu, PRelu, Shrink."""

from __future__ import annotations

import math

import numpy as np
from onnx import helper

from ..graph import attrs
from .registry import rewrite


@rewrite("Gelu")
def _gelu(node, ctx, where):
    """Gelu-20: the builder gives the tanh form the erf gradient, so decompose both forms."""
    (x,) = node.input[:1]
    approx = attrs(node).get("approximate", b"none")
    approx = approx.decode() if isinstance(approx, bytes) else approx
    c = lambda v: ctx.const(np.float32(v))  # noqa: E731
    f = ctx.fresh
    half_x, inner, s, out = f("half_x"), f("inner"), f("s"), node.output[0]
    nodes = [helper.make_node("Mul", [x, c(0.5)], [half_x])]
    if approx == "tanh":
        x3, cubic, u = f("x3"), f("cubic"), f("u")
        nodes += [
            helper.make_node("Pow", [x, c(3.0)], [x3]),
            helper.make_node("Mul", [x3, c(0.044715)], [cubic]),
            helper.make_node("Add", [x, cubic], [inner]),
            helper.make_node("Mul", [inner, c(math.sqrt(2 / math.pi))], [u]),
            helper.make_node("Tanh", [u], [s]),
        ]
    else:
        nodes += [
            helper.make_node("Mul", [x, c(1 / math.sqrt(2))], [inner]),
            helper.make_node("Erf", [inner], [s]),
        ]
    one_plus = f("one_plus")
    nodes += [
        helper.make_node("Add", [s, c(1.0)], [one_plus]),
        helper.make_node("Mul", [half_x, one_plus], [out]),
    ]
    return nodes


@rewrite("Sign")
def _sign(node, ctx, where):
    """Sign is piecewise constant (derivative 0, as in torch) but has no builder gradient: select
    constants with Where, so no gradient flows through it."""
    x = node.input[0]
    gt, lt, inner = ctx.fresh("gt0"), ctx.fresh("lt0"), ctx.fresh("sign_inner")
    zero = ctx.const(np.float32(0), "zero")
    return [
        helper.make_node("Greater", [x, zero], [gt]),
        helper.make_node("Less", [x, zero], [lt]),
        helper.make_node("Where", [lt, ctx.const(np.float32(-1)), zero], [inner]),
        helper.make_node("Where", [gt, ctx.const(np.float32(1)), inner], [node.output[0]]),
    ]


@rewrite("Elu")
def _elu(node, ctx, where):
    """Elu = Relu(x) + alpha (exp(-Relu(-x)) - 1): no Elu gradient in the builder, and this form
    never evaluates exp of a large positive number."""
    alpha = attrs(node).get("alpha", 1.0)
    x = node.input[0]
    f = ctx.fresh
    pos, negx, rn, nrn, e, em1, scaled = (f(k) for k in ("pos", "negx", "rn", "nrn", "e", "em1", "sc"))
    return [
        helper.make_node("Relu", [x], [pos]),
        helper.make_node("Neg", [x], [negx]),
        helper.make_node("Relu", [negx], [rn]),
        helper.make_node("Neg", [rn], [nrn]),
        helper.make_node("Exp", [nrn], [e]),
        helper.make_node("Sub", [e, ctx.const(np.float32(1))], [em1]),
        helper.make_node("Mul", [em1, ctx.const(np.float32(alpha))], [scaled]),
        helper.make_node("Add", [pos, scaled], [node.output[0]]),
    ]


def _hard_sigmoid_nodes(ctx, x, alpha, beta, out):
    lin, shifted = ctx.fresh("hs_lin"), ctx.fresh("hs_shift")
    return [
        helper.make_node("Mul", [x, ctx.const(np.float32(alpha))], [lin]),
        helper.make_node("Add", [lin, ctx.const(np.float32(beta))], [shifted]),
        helper.make_node("Clip", [shifted, ctx.const(np.float32(0)), ctx.const(np.float32(1))], [out]),
    ]


@rewrite("HardSigmoid")
def _hard_sigmoid(node, ctx, where):
    a = attrs(node)
    return _hard_sigmoid_nodes(ctx, node.input[0], a.get("alpha", 0.2), a.get("beta", 0.5), node.output[0])


@rewrite("HardSwish")
def _hard_swish(node, ctx, where):
    hs = ctx.fresh("hard_sigmoid")
    return _hard_sigmoid_nodes(ctx, node.input[0], 1 / 6, 0.5, hs) + [
        helper.make_node("Mul", [node.input[0], hs], [node.output[0]])
    ]


@rewrite("Clip")
def _clip(node, ctx, where):
    """Make Clip's bounds explicit inputs so the custom gradient definitions can read I(1), I(2)."""
    inputs = list(node.input) + [""] * (3 - len(node.input))
    a = attrs(node)
    lo = a.get("min", -np.inf)
    hi = a.get("max", np.inf)
    if not inputs[1]:
        inputs[1] = ctx.const(np.float32(lo), "clip_min")
    if not inputs[2]:
        inputs[2] = ctx.const(np.float32(hi), "clip_max")
    return [helper.make_node("Clip", inputs, list(node.output), name=node.name)]


# ------------------------------------------------------------------ activations without a gradient
# The builder has no gradient for these. Each is rewritten into ops it does differentiate (Where,
# Greater, Exp, Log, Abs, Div, Tanh, Mul, Add, Sub) with the exact formula; positive parts use
# Where(x > 0, x, 0) rather than Relu, so the guided-backprop/deconvnet rules, which replace the
# gradient of Relu, stay confined to the model's own Relus. Every derivative at the kinks equals
# torch's (the side torch takes is named per function).


def _positive_part(ctx, x: str) -> tuple[list, str]:
    """max(x, 0) as Where(x > 0, x, 0): derivative 1 for x > 0, 0 at and below 0 (torch's relu)."""
    gt, pos = ctx.fresh("gt0"), ctx.fresh("pos")
    zero = ctx.const(np.float32(0), "zero")
    return [
        helper.make_node("Greater", [x, zero], [gt]),
        helper.make_node("Where", [gt, x, zero], [pos]),
    ], pos


def _softplus_nodes(ctx, x: str, out: str) -> list:
    """log(1 + e^x) = max(x, 0) + log(1 + e^(-|x|)): never exponentiates a positive number, so no
    overflow for large x; -|x| = x - 2 max(x, 0). Derivative sigmoid(x) everywhere (0.5 at 0)."""
    nodes, pos = _positive_part(ctx, x)
    f = ctx.fresh
    two_pos, neg_abs, e, one_plus, log = f("two_pos"), f("neg_abs"), f("exp"), f("one_plus"), f("log")
    return nodes + [
        helper.make_node("Mul", [pos, ctx.const(np.float32(2))], [two_pos]),
        helper.make_node("Sub", [x, two_pos], [neg_abs]),
        helper.make_node("Exp", [neg_abs], [e]),
        helper.make_node("Add", [e, ctx.const(np.float32(1))], [one_plus]),
        helper.make_node("Log", [one_plus], [log]),
        helper.make_node("Add", [pos, log], [out]),
    ]


@rewrite("Softplus")
def _softplus(node, ctx, where):
    return _softplus_nodes(ctx, node.input[0], node.output[0])


@rewrite("Softsign")
def _softsign(node, ctx, where):
    """x / (1 + |x|)."""
    ab, den = ctx.fresh("abs"), ctx.fresh("den")
    return [
        helper.make_node("Abs", [node.input[0]], [ab]),
        helper.make_node("Add", [ab, ctx.const(np.float32(1))], [den]),
        helper.make_node("Div", [node.input[0], den], [node.output[0]]),
    ]


@rewrite("Mish")
def _mish(node, ctx, where):
    """x tanh(softplus(x)) (opset 18's Mish; torch exports the decomposed form itself)."""
    sp, t = ctx.fresh("softplus"), ctx.fresh("tanh")
    return _softplus_nodes(ctx, node.input[0], sp) + [
        helper.make_node("Tanh", [sp], [t]),
        helper.make_node("Mul", [node.input[0], t], [node.output[0]]),
    ]


def _elu_family(ctx, x: str, alpha: float, inner: float, gamma: float, out: str) -> list:
    """gamma (max(x, 0) + alpha (exp(min(x, 0) / inner) - 1)): Elu (inner = gamma = 1), Selu
    (inner = 1), Celu (inner = alpha, gamma = 1). exp only sees non-positive numbers. At x = 0 the
    derivative is gamma alpha / inner, as in torch (its elu backward takes the x <= 0 branch)."""
    nodes, pos = _positive_part(ctx, x)
    f = ctx.fresh
    neg, e, em1, scaled, total = f("neg"), f("exp"), f("em1"), f("scaled"), f("elu")
    neg_in = neg
    nodes += [helper.make_node("Sub", [x, pos], [neg])]
    if inner != 1.0:
        neg_in = f("neg_scaled")
        nodes.append(helper.make_node("Mul", [neg, ctx.const(np.float32(1 / inner))], [neg_in]))
    nodes += [
        helper.make_node("Exp", [neg_in], [e]),
        helper.make_node("Sub", [e, ctx.const(np.float32(1))], [em1]),
        helper.make_node("Mul", [em1, ctx.const(np.float32(alpha))], [scaled]),
        helper.make_node("Add", [pos, scaled], [total if gamma != 1.0 else out]),
    ]
    if gamma != 1.0:
        nodes.append(helper.make_node("Mul", [total, ctx.const(np.float32(gamma))], [out]))
    return nodes


@rewrite("Selu")
def _selu(node, ctx, where):
    a = attrs(node)
    alpha = a.get("alpha", 1.67326319217681884765625)
    gamma = a.get("gamma", 1.05070102214813232421875)
    return _elu_family(ctx, node.input[0], alpha, 1.0, gamma, node.output[0])


@rewrite("Celu")
def _celu(node, ctx, where):
    alpha = attrs(node).get("alpha", 1.0)
    return _elu_family(ctx, node.input[0], alpha, alpha, 1.0, node.output[0])


@rewrite("ThresholdedRelu")
def _thresholded_relu(node, ctx, where):
    """x if x > alpha else 0: Where(x > alpha, x, 0)."""
    alpha = attrs(node).get("alpha", 1.0)
    gt = ctx.fresh("gt_alpha")
    return [
        helper.make_node("Greater", [node.input[0], ctx.const(np.float32(alpha), "alpha")], [gt]),
        helper.make_node("Where", [gt, node.input[0], ctx.const(np.float32(0), "zero")], [node.output[0]]),
    ]


@rewrite("PRelu")
def _prelu(node, ctx, where):
    """Where(x > 0, x, slope x): derivative slope at x = 0, as torch's prelu backward."""
    x, slope = node.input[:2]
    gt, scaled = ctx.fresh("gt0"), ctx.fresh("prelu_neg")
    return [
        helper.make_node("Greater", [x, ctx.const(np.float32(0), "zero")], [gt]),
        helper.make_node("Mul", [x, slope], [scaled]),
        helper.make_node("Where", [gt, x, scaled], [node.output[0]]),
    ]


@rewrite("Shrink")
def _shrink(node, ctx, where):
    """Shrink: x + bias for x < -lambd, x - bias for x > lambd, else 0."""
    a = attrs(node)
    lambd, bias = a.get("lambd", 0.5), a.get("bias", 0.0)
    x = node.input[0]
    f = ctx.fresh
    lo, hi, plus, minus, inner = f("lt"), f("gt"), f("plus"), f("minus"), f("inner")
    c = lambda v: ctx.const(np.float32(v))  # noqa: E731
    return [
        helper.make_node("Less", [x, c(-lambd)], [lo]),
        helper.make_node("Greater", [x, c(lambd)], [hi]),
        helper.make_node("Add", [x, c(bias)], [plus]),
        helper.make_node("Sub", [x, c(bias)], [minus]),
        helper.make_node("Where", [hi, minus, c(0.0)], [inner]),
        helper.make_node("Where", [lo, plus, inner], [node.output[0]]),
    ]
