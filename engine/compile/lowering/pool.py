"""Lowerings of MaxPoolGrad and AveragePoolGrad, which the builder emits in the ai.onnx domain."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from ...errors import LoweringError
from ..graph import attrs
from .conv import explicit_pads, transpose_to_input
from .registry import lowering, make


def _forward_input_of(ctx, node, op_type: str, match) -> str:
    for fwd in ctx.graph.node:
        if fwd.op_type == op_type and match(fwd):
            return fwd.input[0]
    raise LoweringError(f"node {node.name!r}: cannot find the forward {op_type} it differentiates")


@lowering("MaxPoolGrad", "")
def max_pool_grad(node, ctx):
    """Scatter dY to the argmax positions; MaxPool's Indices are flat over the whole tensor."""
    dy, indices = node.input
    x = _forward_input_of(ctx, node, "MaxPool", lambda f: len(f.output) > 1 and f.output[1] == indices)
    if attrs(node).get("storage_order", 0):
        raise LoweringError(f"node {node.name!r}: MaxPool with storage_order=1 is not supported")
    return _scatter_add_flat(ctx, x, indices, dy, node.output[0])


def _scatter_add_flat(ctx, x, flat_positions, values, out):
    shape, size, zeros, pos, val, scattered = (
        ctx.fresh(k) for k in ("x_shape", "x_size", "zeros", "pos", "val", "scattered")
    )
    minus_one = ctx.const(np.array([-1], np.int64))
    return [
        make("Shape", [x], [shape]),
        make("Size", [x], [size + "_"]),
        make("Reshape", [size + "_", minus_one], [size]),
        make("ConstantOfShape", [size], [zeros], value=helper.make_tensor("z", TensorProto.FLOAT, [1], [0])),
        make("Reshape", [flat_positions, minus_one], [pos]),
        make("Reshape", [values, minus_one], [val]),
        make("ScatterElements", [zeros, pos, val], [scattered], axis=0, reduction="add"),
        make("Reshape", [scattered, shape], [out]),
    ]


def _average_pool_divisor(spatial, kernel, strides, begin, end, ceil_mode, include_pad):
    """Divisor of each output position, as onnxruntime's AveragePool computes it (static dims)."""
    axes = []
    for size, k, s, pb, pe in zip(spatial, kernel, strides, begin, end):
        span = size + pb + pe - k
        n_out = (-(-span // s) if ceil_mode else span // s) + 1
        if ceil_mode and (n_out - 1) * s >= size + pb:  # last window must start inside input+begin pad
            n_out -= 1
        start = np.arange(n_out) * s - pb
        stop = np.minimum(start + k, size + pe)
        if include_pad:
            count = stop - start
        else:
            count = np.minimum(stop, size) - np.maximum(start, 0)
        axes.append(count.astype(np.float64))
    div = axes[0]
    for c in axes[1:]:
        div = np.multiply.outer(div, c)
    return div


@lowering("AveragePoolGrad", "")
def average_pool_grad(node, ctx):
    (dy,) = node.input
    x = _forward_input_of(ctx, node, "AveragePool", lambda f: f.output[0] + "_grad" == dy)
    a = attrs(node)
    kernel = list(a["kernel_shape"])
    n = len(kernel)
    if any(d != 1 for d in a.get("dilations", [1] * n)):
        raise LoweringError(f"node {node.name!r}: AveragePool with dilations is not supported")
    strides = list(a.get("strides", [1] * n))
    spatial = ctx.spatial_static(x)
    channels = (ctx.shapes.get(x) or [None, None])[1]
    if spatial is None or not isinstance(channels, int):
        raise LoweringError(
            f"node {node.name!r}: AveragePool gradient needs static channel and "
            f"spatial dims for {x!r}; export with a fixed input size"
        )
    begin, end = explicit_pads(a, spatial, kernel, strides, node.name)
    div = _average_pool_divisor(
        spatial, kernel, strides, begin, end, a.get("ceil_mode", 0), a.get("count_include_pad", 0)
    )
    inv = ctx.const((1.0 / div).astype(np.float32)[None, None], "avgpool_inv_divisor")
    ones = ctx.const(np.ones([channels, 1, *kernel], np.float32), "avgpool_ones")
    scaled = ctx.fresh("dy_scaled")
    ctx.shapes[scaled] = ctx.shapes.get(dy)
    return [make("Mul", [dy, inv], [scaled])] + transpose_to_input(
        ctx, scaled, x, ones, kernel, strides, [1] * n, channels, begin, node.output[0]
    )
