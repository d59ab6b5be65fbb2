"""BatchNormalization, LayerNormalization and InstanceNormalization in forms the builder
differentiates."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ...errors import UnsupportedModelError
from ..graph import attrs
from .registry import rewrite


def batchnorm_factors(gamma, beta, mean, var, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Eval-mode BatchNormalization as y = a·x + b: (a, b) float32, computed in float64. Also
    used by ``engine.initializers`` to recompute them from replaced weights."""
    gamma, beta, mu, sigma2 = (np.asarray(v, np.float64) for v in (gamma, beta, mean, var))
    a = gamma / np.sqrt(sigma2 + eps)
    b = beta - mu * a
    return a.astype(np.float32), b.astype(np.float32)


@rewrite("BatchNormalization")
def _batchnorm(node, ctx, where):
    """Eval-mode BatchNormalization -> Mul/Add with the running statistics (no gradient builder)."""
    x, scale, bias, mean, var = node.input[:5]
    values = [ctx.const_value(n) for n in (scale, bias, mean, var)]
    if any(v is None for v in values):
        raise UnsupportedModelError(
            f"{where}: node {node.name!r} (BatchNormalization) has non-constant parameters; "
            "export the model in eval mode"
        )
    if len([o for o in node.output if o]) > 1 or attrs(node).get("training_mode", 0):
        raise UnsupportedModelError(
            f"{where}: node {node.name!r} (BatchNormalization) is in "
            "training mode; export the model in eval mode"
        )
    a, b = batchnorm_factors(*values, attrs(node).get("epsilon", 1e-5))
    rank = ctx.rank(x)
    if rank is None:
        raise UnsupportedModelError(f"{where}: node {node.name!r}: rank of {x!r} unknown")
    bshape = [-1] + [1] * (rank - 2)
    scaled = ctx.fresh("bn_scaled")
    return [
        helper.make_node(
            "Mul",
            [x, ctx.const(a.reshape(bshape), "bn_a")],
            [scaled],
            name=node.name + "/mul",
        ),
        helper.make_node(
            "Add",
            [scaled, ctx.const(b.reshape(bshape), "bn_b")],
            [node.output[0]],
            name=node.name + "/add",
        ),
    ]


@rewrite("LayerNormalization")
def _layernorm(node, ctx, where):
    """The builder needs LayerNormalization's Mean and InvStdDev outputs; torch exports one."""
    outs = list(node.output) + [""] * (3 - len(node.output))
    outs[1] = outs[1] or ctx.fresh("ln_mean")
    outs[2] = outs[2] or ctx.fresh("ln_inv_std")
    n = onnx.NodeProto()
    n.CopyFrom(node)
    del n.output[:]
    n.output.extend(outs)
    # The builder writes the scale and bias gradients of every LayerNormalization under
    # "<name>_grad", so two nodes sharing one tensor (a LayerNorm module applied twice, as in
    # swin_t) define it twice: give each later use its own copy. (A scale computed from the input
    # would need its own gradient, which the LayerNormalizationGrad lowering refuses anyway.)
    for i in (1, 2):
        name = n.input[i] if len(n.input) > i else ""
        if not name:
            continue
        seen = _layernorm_params(ctx)
        if name not in seen:
            seen.add(name)
            continue
        value = ctx.const_value(name)
        if value is not None:
            n.input[i] = ctx.const(value, "ln_param")
    return [n]


def _layernorm_params(ctx) -> set:
    """Scale/bias tensors already used by a LayerNormalization of this graph (kept on ctx)."""
    if not hasattr(ctx, "_layernorm_params"):
        ctx._layernorm_params = set()
    return ctx._layernorm_params


@rewrite("InstanceNormalization")
def _instance_norm(node, ctx, where):
    """InstanceNormalization (no gradient in the builder; GroupNorm exports as one) decomposed:
    over (N, C, rest) flattened to three axes, y = (x - mean) / sqrt(var + eps) * scale + bias with
    the biased variance, as the ONNX spec and torch define it. Rank-agnostic: the spatial dims may
    be symbolic."""
    x, scale, bias = node.input[:3]
    eps = attrs(node).get("epsilon", 1e-5)
    f = ctx.fresh
    shape, x3, mean, d, d2, var, ve, den, xn, s2, b2, sc, y3 = (
        f(k)
        for k in (
            "shape",
            "x3",
            "mean",
            "centred",
            "sq",
            "var",
            "var_eps",
            "std",
            "xn",
            "scale",
            "bias",
            "scaled",
            "y3",
        )
    )
    axes = ctx.const(np.array([2], np.int64), "axes")

    def mean_over_rest(src, out):
        if ctx.opset >= 18:
            return helper.make_node("ReduceMean", [src, axes], [out], keepdims=1)
        return helper.make_node("ReduceMean", [src], [out], axes=[2], keepdims=1)

    one = ctx.const(np.array([1], np.int64), "axes")
    return [
        helper.make_node("Shape", [x], [shape]),
        helper.make_node("Reshape", [x, ctx.const(np.array([0, 0, -1], np.int64), "shape")], [x3]),
        mean_over_rest(x3, mean),
        helper.make_node("Sub", [x3, mean], [d]),
        helper.make_node("Mul", [d, d], [d2]),
        mean_over_rest(d2, var),
        helper.make_node("Add", [var, ctx.const(np.float32(eps), "eps")], [ve]),
        helper.make_node("Sqrt", [ve], [den]),
        helper.make_node("Div", [d, den], [xn]),
        helper.make_node("Unsqueeze", [scale, one], [s2]),
        helper.make_node("Unsqueeze", [bias, one], [b2]),
        helper.make_node("Mul", [xn, s2], [sc]),
        helper.make_node("Add", [sc, b2], [y3]),
        helper.make_node("Reshape", [y3, shape], [node.output[0]]),
    ]
