"""Lowerings of the arithmetic training ops: Scale, FusedMatMul and DivGrad's broadcast reductions."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from ...errors import LoweringError
from ..graph import attrs
from .registry import lowering, make
from .tensor import sum_to_shape


@lowering("Scale")
def scale(node, ctx):
    x, s = node.input
    cast = ctx.fresh("scale_f32")
    op = "Div" if attrs(node).get("scale_down", 0) else "Mul"
    return [make("Cast", [s], [cast], to=TensorProto.FLOAT), make(op, [x, cast], node.output)]


@lowering("FusedMatMul")
def fused_matmul(node, ctx):
    a = attrs(node)
    if a.get("transBatchA", 0) or a.get("transBatchB", 0):
        raise LoweringError(f"node {node.name!r}: FusedMatMul with transBatch is not supported")
    nodes, ins = [], list(node.input)
    for i, key in ((0, "transA"), (1, "transB")):
        if a.get(key, 0):
            rank = ctx.rank(ins[i])
            if rank is None:
                raise LoweringError(f"node {node.name!r}: FusedMatMul {key} needs the rank of {ins[i]!r}")
            perm = list(range(rank - 2)) + [rank - 1, rank - 2]
            t = ctx.fresh("transposed")
            nodes.append(make("Transpose", [ins[i]], [t], perm=perm))
            ins[i] = t
    alpha = a.get("alpha", 1.0)
    if alpha == 1.0:
        return nodes + [make("MatMul", ins, node.output)]
    mm = ctx.fresh("matmul")
    return nodes + [make("MatMul", ins, [mm]), make("Mul", [mm, ctx.const(np.float32(alpha))], node.output)]


@lowering("DivGrad")
def div_grad(node, ctx):
    """Y = A / B: dA = sum(dY / B), dB = sum(-dY A / B²) = sum(-(dY / B)(A / B)), each summed over
    the axes its operand was broadcast along (the builder's kernel reduces internally)."""
    dy, a, b = node.input[:3]
    outs = list(node.output) + [""] * (2 - len(node.output))
    n = ctx.fresh
    q = n("dy_over_b")
    nodes = [make("Div", [dy, b], [q])]
    if outs[0]:
        nodes += sum_to_shape(ctx, q, a, dy, outs[0])
    if outs[1]:
        ab, prod, neg = n("a_over_b"), n("prod"), n("neg")
        nodes += [
            make("Div", [a, b], [ab]),
            make("Mul", [q, ab], [prod]),
            make("Neg", [prod], [neg]),
        ]
        nodes += sum_to_shape(ctx, neg, b, dy, outs[1])
    return nodes
