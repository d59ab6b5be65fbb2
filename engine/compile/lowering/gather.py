"""Lowerings of the builder's gradient ops for GatherElements, GatherND and Trilu (issue #9 §1:
ops the lowering lacked; take_along_dim, advanced indexing and triu/tril masks export them).

- GatherElementsGrad(dY, shape, indices; axis): ScatterElements(zeros(shape), indices, dY,
  reduction=add) along axis, after making negative indices non-negative (indices + dim where < 0).
- GatherNDGrad(shape, indices, dY; batch_dims=0): ScatterND(zeros(shape), indices, dY,
  reduction=add) (opset 16); batch_dims > 0 is refused.
- com.microsoft::Trilu (the builder's gradient of Trilu is the same mask in its own domain): the
  standard Trilu-14 with the same inputs and attribute.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from ...errors import LoweringError
from ..graph import attrs
from .registry import lowering, make


def _zeros(ctx, shape, out):
    value = helper.make_tensor("z", TensorProto.FLOAT, [1], [0])
    return make("ConstantOfShape", [shape], [out], value=value)


@lowering("GatherElementsGrad")
def gather_elements_grad(node, ctx):
    dy, shape, indices = node.input[:3]
    axis = attrs(node).get("axis", 0)
    rank = ctx.rank(dy)
    if rank is None:
        raise LoweringError(f"node {node.name!r}: GatherElements gradient needs the rank of {dy!r}")
    axis %= rank
    zeros, idx, neg, dim, wrapped, fixed = (
        ctx.fresh(k) for k in ("zeros", "idx", "neg", "dim", "wrapped", "fixed")
    )
    return [
        _zeros(ctx, shape, zeros),
        make("Cast", [indices], [idx], to=TensorProto.INT64),
        make("Less", [idx, ctx.const(np.array(0, np.int64))], [neg]),
        make("Gather", [shape, ctx.const(np.array(axis, np.int64))], [dim], axis=0),
        make("Add", [idx, dim], [wrapped]),
        make("Where", [neg, wrapped, idx], [fixed]),
        make("ScatterElements", [zeros, fixed, dy], node.output[:1], axis=axis, reduction="add"),
    ]


@lowering("GatherNDGrad")
def gather_nd_grad(node, ctx):
    shape, indices, dy = node.input[:3]
    if attrs(node).get("batch_dims", 0):
        raise LoweringError(f"node {node.name!r}: GatherND gradient with batch_dims > 0 is not supported")
    zeros, idx = ctx.fresh("zeros"), ctx.fresh("idx")
    return [
        _zeros(ctx, shape, zeros),
        make("Cast", [indices], [idx], to=TensorProto.INT64),
        make("ScatterND", [zeros, idx, dy], node.output[:1], reduction="add"),
    ]


@lowering("Trilu")
def trilu(node, ctx):
    return [make("Trilu", list(node.input), list(node.output), upper=attrs(node).get("upper", 1))]
