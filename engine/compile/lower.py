"""Lower onnxruntime-training gradient ops to standard ONNX (design/lowering.md, the table).

One rewrite function per training-only op. Each takes the node and a GraphContext and returns the
standard nodes that produce the same output names. Every lowering is checked numerically against
the builder's own kernels (self-check) and against torch autograd (tests/test_lowering.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import LoweringError
from .graph import GraphContext, attrs

LOWERINGS: dict[tuple[str, str], Callable] = {}


def lowering(op_type: str, domain: str = "com.microsoft"):
    def register(fn):
        LOWERINGS[(domain, op_type)] = fn
        return fn

    return register


def make(op: str, inputs, outputs, **kwargs) -> onnx.NodeProto:
    return helper.make_node(op, list(inputs), list(outputs), **kwargs)


def _reduce(ctx: GraphContext, op: str, x: str, axes, out: str, keepdims: int = 1):
    """ReduceSum takes axes as an input from opset 13, the other reductions from opset 18."""
    version_with_input = 13 if op == "ReduceSum" else 18
    if ctx.opset >= version_with_input:
        return make(op, [x, ctx.const(np.array(axes, np.int64), "axes")], [out], keepdims=keepdims)
    return make(op, [x], [out], axes=list(axes), keepdims=keepdims)


def _zero(ctx):
    return ctx.const(np.float32(0), "zero")


# ----------------------------------------------------------------- element-wise activations


@lowering("ReluGrad")
def relu_grad(node, ctx):
    dy, x = node.input
    mask, mask_f = ctx.fresh("relu_mask"), ctx.fresh("relu_mask_f")
    # Mul by a float mask: faster than Where(mask, dY, 0) in onnxruntime
    return [
        make("Greater", [x, _zero(ctx)], [mask]),
        make("Cast", [mask], [mask_f], to=TensorProto.FLOAT),
        make("Mul", [dy, mask_f], node.output),
    ]


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
        make("Greater", [y, _zero(ctx)], [mask]),
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
        _reduce(ctx, "ReduceSum", prod, [axis], total),
        make("Sub", [dy, total], [diff]),
        make("Mul", [y, diff], node.output),
    ]


@lowering("LogSoftmaxGrad_13")
def log_softmax_grad(node, ctx):
    dy, y = node.input
    axis = attrs(node).get("axis", -1)
    total, p, scaled = ctx.fresh("sum_dy"), ctx.fresh("softmax"), ctx.fresh("p_sum")
    return [
        _reduce(ctx, "ReduceSum", dy, [axis], total),
        make("Exp", [y], [p]),
        make("Mul", [p, total], [scaled]),
        make("Sub", [dy, scaled], node.output),
    ]


def _gelu_derivative(ctx, x: str, out: str, approximate: bool) -> list:
    """d gelu / dx. erf form: Φ(x) + x φ(x); tanh form: derivative of 0.5 x (1 + tanh(u))."""
    n = ctx.fresh
    c = lambda v: ctx.const(np.float32(v))  # noqa: E731
    if not approximate:
        s, e, cdf, x2, h, pdf, xpdf = (n(k) for k in ("xs", "erf", "cdf", "x2", "h", "pdf", "xpdf"))
        return [
            make("Mul", [x, c(1 / math.sqrt(2))], [s]),
            make("Erf", [s], [e]),
            make("Add", [e, c(1.0)], [cdf + "_"]),
            make("Mul", [cdf + "_", c(0.5)], [cdf]),
            make("Mul", [x, x], [x2]),
            make("Mul", [x2, c(-0.5)], [h]),
            make("Exp", [h], [pdf + "_"]),
            make("Mul", [pdf + "_", c(1 / math.sqrt(2 * math.pi))], [pdf]),
            make("Mul", [x, pdf], [xpdf]),
            make("Add", [cdf, xpdf], [out]),
        ]
    k, a = math.sqrt(2 / math.pi), 0.044715
    x2, x3, inner, u, t, t1, t2, one_m, du, p1, p2, p3 = (
        n(s) for s in ("x2", "x3", "inner", "u", "t", "t1", "t2", "one_m", "du", "p1", "p2", "p3")
    )
    return [
        make("Mul", [x, x], [x2]),
        make("Mul", [x2, x], [x3]),
        make("Mul", [x3, c(a)], [inner + "_"]),
        make("Add", [x, inner + "_"], [inner]),
        make("Mul", [inner, c(k)], [u]),
        make("Tanh", [u], [t]),
        make("Add", [t, c(1.0)], [t1]),
        make("Mul", [t1, c(0.5)], [p1]),  # 0.5 (1 + t)
        make("Mul", [t, t], [t2]),
        make("Sub", [c(1.0), t2], [one_m]),  # 1 - t^2
        make("Mul", [x2, c(3 * a * k)], [du + "_"]),
        make("Add", [du + "_", c(k)], [du]),  # du/dx
        make("Mul", [one_m, du], [p2]),
        make("Mul", [p2, x], [p3 + "_"]),
        make("Mul", [p3 + "_", c(0.5)], [p3]),
        make("Add", [p1, p3], [out]),
    ]


def _gelu_family(approximate: bool, with_bias: bool):
    def lower(node, ctx):
        dy, x = node.input[0], node.input[1]
        nodes = []
        if with_bias:
            xb = ctx.fresh("x_plus_bias")
            nodes.append(make("Add", [x, node.input[2]], [xb]))
            x = xb
        d = ctx.fresh("gelu_d")
        return nodes + _gelu_derivative(ctx, x, d, approximate) + [make("Mul", [dy, d], node.output[:1])]

    return lower


lowering("GeluGrad")(_gelu_family(False, False))
lowering("FastGeluGrad")(_gelu_family(True, False))
lowering("BiasGeluGrad_dX")(_gelu_family(False, True))
lowering("BiasFastGeluGrad_dX")(_gelu_family(True, True))


@lowering("QuickGeluGrad")
def quick_gelu_grad(node, ctx):
    dy, x = node.input
    alpha = attrs(node).get("alpha", 1.702)
    ax, s, one_m, t, d, dd = (ctx.fresh(k) for k in ("ax", "s", "one_m", "t", "d", "dd"))
    return [
        make("Mul", [x, ctx.const(np.float32(alpha))], [ax]),
        make("Sigmoid", [ax], [s]),
        make("Sub", [ctx.const(np.float32(1)), s], [one_m]),
        make("Mul", [ax, one_m], [t]),
        make("Add", [ctx.const(np.float32(1)), t], [d]),
        make("Mul", [s, d], [dd]),
        make("Mul", [dy, dd], node.output),
    ]


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


# ------------------------------------------------------------------------ convolution, pooling


def _explicit_pads(a: dict, spatial_in: list[int] | None, kernel_eff: list[int], strides, name):
    """Begin/end pads of a Conv/Pool, resolving auto_pad when the spatial size is static."""
    n = len(kernel_eff)
    auto_pad = a.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("NOTSET", ""):
        pads = list(a.get("pads", [0] * 2 * n))
        return pads[:n], pads[n:]
    if auto_pad == "VALID":
        return [0] * n, [0] * n
    if spatial_in is None:
        raise LoweringError(
            f"node {name!r}: auto_pad={auto_pad} with dynamic spatial dims cannot be lowered; "
            "export the model with explicit pads or a static input size"
        )
    begin, end = [], []
    for size, k, s in zip(spatial_in, kernel_eff, strides):
        out = -(-size // s)
        total = max((out - 1) * s + k - size, 0)
        small, large = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else large)
        end.append(large if auto_pad == "SAME_UPPER" else small)
    return begin, end


def _transpose_to_input(ctx, dy, x, kernel, kernel_eff, strides, dilations, group, begin, out_name):
    """dX = ConvTranspose(dY, kernel) cropped or padded back to X's spatial size."""
    spatial_in = ctx.spatial_static(x)
    spatial_out = ctx.spatial_static(dy)
    n = len(kernel_eff)
    common = dict(strides=list(strides), dilations=list(dilations), group=group)
    if spatial_in is not None and spatial_out is not None:
        end_pads, out_pad = [], []
        for size, size_out, k, s, pb in zip(spatial_in, spatial_out, kernel_eff, strides, begin):
            full = s * (size_out - 1) + k
            end_pads.append(max(full - pb - size, 0))
            out_pad.append(max(pb + size - full, 0))
        return [
            make(
                "ConvTranspose",
                [dy, kernel],
                [out_name],
                pads=list(begin) + end_pads,
                output_padding=out_pad,
                **common,
            )
        ]
    # Dynamic spatial dims: the full transposed convolution (plus s-1 so nothing is short), then
    # a Slice of X's spatial size starting at the begin pads.
    full, shape, sizes, ends = (ctx.fresh(k) for k in ("convT_full", "x_shape", "x_spatial", "ends"))
    return [
        make(
            "ConvTranspose",
            [dy, kernel],
            [full],
            pads=[0] * 2 * n,
            output_padding=[s - 1 for s in strides],
            **common,
        ),
        make("Shape", [x], [shape]),
        make(
            "Slice",
            [shape, ctx.const(np.array([2], np.int64)), ctx.const(np.array([2 + n], np.int64))],
            [sizes],
        ),
        make("Add", [sizes, ctx.const(np.array(begin, np.int64))], [ends]),
        make(
            "Slice",
            [
                full,
                ctx.const(np.array(begin, np.int64)),
                ends,
                ctx.const(np.arange(2, 2 + n, dtype=np.int64)),
            ],
            [out_name],
        ),
    ]


@lowering("ConvGrad")
def conv_grad(node, ctx):
    dy, x, w = node.input[:3]
    extra = [o for o in node.output[1:] if o]
    if extra:
        raise LoweringError(
            f"node {node.name!r}: weight gradients requested ({extra}); "
            "onnxplain differentiates with respect to the input only"
        )
    a = attrs(node)
    w_value = ctx.const_value(w)
    kernel = list(a.get("kernel_shape") or (w_value.shape[2:] if w_value is not None else []))
    if not kernel:
        raise LoweringError(f"node {node.name!r}: ConvGrad without kernel_shape and a non-constant weight")
    n = len(kernel)
    strides = list(a.get("strides", [1] * n))
    dilations = list(a.get("dilations", [1] * n))
    group = int(a.get("group", 1))
    kernel_eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    begin, end = _explicit_pads(a, ctx.spatial_static(x), kernel_eff, strides, node.name)
    out = node.output[0]
    # Stride 1 and a constant kernel: a plain Conv with the flipped, channel-swapped kernel is
    # about 2x faster on CPU than ConvTranspose (depthwise ConvTranspose is slow).
    if all(s == 1 for s in strides) and w_value is not None:
        conv_pads = [k - 1 - p for k, p in zip(kernel_eff, begin)] + [
            k - 1 - p for k, p in zip(kernel_eff, end)
        ]
        if min(conv_pads) >= 0:
            return [_flipped_conv(ctx, dy, w_value, group, conv_pads, dilations, out)]
    nodes = _zero_inserted_conv(ctx, dy, x, w_value, kernel_eff, strides, dilations, group, begin, out)
    if nodes is not None:
        return nodes
    return _transpose_to_input(ctx, dy, x, w, kernel_eff, strides, dilations, group, begin, out)


def flipped_kernel(w_value: np.ndarray, group: int) -> np.ndarray:
    """The flipped, in/out-swapped kernel of a Conv weight (float32): the adjoint's weight.
    Also used by ``engine.initializers`` to recompute it from replaced weights."""
    n = w_value.ndim - 2
    c_out, c_in_g = w_value.shape[:2]
    wg = w_value.reshape(group, c_out // group, c_in_g, *w_value.shape[2:])
    wt = np.swapaxes(wg, 1, 2).reshape(group * c_in_g, c_out // group, *w_value.shape[2:])
    wt = np.ascontiguousarray(wt[(slice(None), slice(None)) + (slice(None, None, -1),) * n])
    return wt.astype(np.float32)


def _flipped_conv(ctx, dy, w_value, group, pads, dilations, out) -> onnx.NodeProto:
    """Stride-1 Conv of dY with the flipped, in/out-swapped kernel: the adjoint of a stride-1 Conv."""
    n = w_value.ndim - 2
    return make(
        "Conv",
        [dy, ctx.const(flipped_kernel(w_value, group), "conv_grad_kernel")],
        [out],
        pads=list(pads),
        dilations=list(dilations),
        group=group,
        strides=[1] * n,
    )


_TALL_MAX_PLANE = 256  # output pixels per plane up to which zeros go into one tall image


def _zero_inserted_conv(ctx, dy, x, w_value, kernel_eff, strides, dilations, group, begin, out):
    """Strided depthwise ConvGrad as zero insertion + a stride-1 Conv with the flipped kernel.

    onnxruntime's grouped ConvTranspose runs a GEMM and a col2im per image and channel (no
    blocked NCHWc kernel), and the NCHW tensor it writes pulls the following mask Mul out of NCHWc
    as well: two full-resolution reorders. Zero insertion is a 1x1 depthwise ConvTranspose (no
    overlap, cheap); the stride-1 Conv runs in NCHWc and keeps its consumers there. Measured on
    EfficientNet-Lite0 (batch 16): 3x3 at 112x112, 34 -> 17 ms; 5x5 at 56x56, 22 -> 8 ms. Needs a
    constant depthwise kernel and static spatial sizes; returns None (use ConvTranspose) otherwise.
    """
    if w_value is None:
        return None
    c_out, c_in_g = w_value.shape[:2]
    if c_in_g != 1 or group != c_out:
        return None
    spatial_in, spatial_out = ctx.spatial_static(x), ctx.spatial_static(dy)
    if spatial_in is None or spatial_out is None:
        return None
    # Z[s*i] = dY[i], length s*(Ho-1)+1; dX[t] = sum_a Wflip[a] Z[t - (k_eff-1-pb) + a*d].
    pads_begin = [k - 1 - pb for k, pb in zip(kernel_eff, begin)]
    pads_end = [
        size + pb - s * (size_out - 1) - 1
        for size, size_out, s, pb in zip(spatial_in, spatial_out, strides, begin)
    ]
    if min(pads_begin + pads_end) < 0:
        return None
    inserted = ctx.fresh("zero_inserted")
    tall_pad = pads_end[0] - (strides[0] - 1)
    if len(strides) == 2 and np.prod(spatial_out) <= _TALL_MAX_PLANE and tall_pad >= 0:
        # Small planes: the per-(image, channel) loop dominates, so insert the zeros into one tall
        # single-channel image (1, 1, N*C*Ho, Wo). Every plane then ends with s-1 zero rows, which
        # the Conv's end pad absorbs. 672 channels at 7x7: 2.3 -> 0.8 ms.
        tall, tall_out = ctx.fresh("tall"), ctx.fresh("tall_inserted")
        (s_h, s_w), (h_out, w_out) = strides, spatial_out
        insert = [
            make("Reshape", [dy, ctx.const(np.array([1, 1, -1, w_out], np.int64))], [tall]),
            make(
                "ConvTranspose",
                [tall, ctx.const(np.ones((1, 1, 1, 1), np.float32), "zero_insert_kernel")],
                [tall_out],
                strides=list(strides),
                output_padding=[s_h - 1, 0],
            ),
            make(
                "Reshape",
                [tall_out, ctx.const(np.array([-1, c_out, s_h * h_out, s_w * (w_out - 1) + 1], np.int64))],
                [inserted],
            ),
        ]
        pads_end[0] = tall_pad
    else:
        ones = ctx.const(np.ones((c_out, 1) + (1,) * len(strides), np.float32), "zero_insert_kernel")
        insert = [make("ConvTranspose", [dy, ones], [inserted], strides=list(strides), group=group)]
    return insert + [_flipped_conv(ctx, inserted, w_value, group, pads_begin + pads_end, dilations, out)]


@lowering("ConvTransposeGrad")
def conv_transpose_grad(node, ctx):
    """ConvTranspose is the adjoint of Conv: dX = Conv(dY, W) with the same strides, dilations,
    group and begin pads; the end pad shrinks by output_padding (those rows saw no input)."""
    dy, _x, w = node.input[:3]
    if any(o for o in node.output[1:]):
        raise LoweringError(f"node {node.name!r}: weight gradients requested; input gradients only")
    a = attrs(node)
    auto_pad = a.get("auto_pad", b"NOTSET")
    if (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) not in ("NOTSET", "") or (
        a.get("output_shape")
    ):
        raise LoweringError(
            f"node {node.name!r}: ConvTranspose with auto_pad or output_shape is not "
            "supported; export it with explicit pads"
        )
    w_value = ctx.const_value(w)
    kernel = list(a.get("kernel_shape") or (w_value.shape[2:] if w_value is not None else []))
    n = len(kernel)
    pads = list(a.get("pads", [0] * 2 * n))
    out_pad = list(a.get("output_padding", [0] * n))
    end = [max(pe - op, 0) for pe, op in zip(pads[n:], out_pad)]
    return [
        make(
            "Conv",
            [dy, w],
            [node.output[0]],
            pads=pads[:n] + end,
            strides=list(a.get("strides", [1] * n)),
            dilations=list(a.get("dilations", [1] * n)),
            group=int(a.get("group", 1)),
            kernel_shape=kernel,
        )
    ]


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
    begin, end = _explicit_pads(a, spatial, kernel, strides, node.name)
    div = _average_pool_divisor(
        spatial, kernel, strides, begin, end, a.get("ceil_mode", 0), a.get("count_include_pad", 0)
    )
    inv = ctx.const((1.0 / div).astype(np.float32)[None, None], "avgpool_inv_divisor")
    ones = ctx.const(np.ones([channels, 1, *kernel], np.float32), "avgpool_ones")
    scaled = ctx.fresh("dy_scaled")
    ctx.shapes[scaled] = ctx.shapes.get(dy)
    return [make("Mul", [dy, inv], [scaled])] + _transpose_to_input(
        ctx, scaled, x, ones, kernel, strides, [1] * n, channels, begin, node.output[0]
    )


# --------------------------------------------------------------------------- indexing, shapes


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
        _reduce(ctx, "ReduceProd", pre + "_c", [0], pre),
        make("Concat", [one, post_dims], [post + "_c"], axis=0),
        _reduce(ctx, "ReduceProd", post + "_c", [0], post),
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
        _reduce(ctx, "ReduceProd", shape, [0], total, keepdims=0),
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


def _sum_to_shape(ctx, t: str, like: str, full_like: str, out: str) -> list:
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
        nodes += _sum_to_shape(ctx, q, a, dy, outs[0])
    if outs[1]:
        ab, prod, neg = n("a_over_b"), n("prod"), n("neg")
        nodes += [
            make("Div", [a, b], [ab]),
            make("Mul", [q, ab], [prod]),
            make("Neg", [prod], [neg]),
        ]
        nodes += _sum_to_shape(ctx, neg, b, dy, outs[1])
    return nodes


@lowering("LayerNormalizationGrad")
def layer_norm_grad(node, ctx):
    """dX = σ⁻¹ (g − mean(g) − x̂ mean(g x̂)), g = dY γ, x̂ = (X − μ) σ⁻¹, means over the normalised axes."""
    dy, x, gamma, mean, inv_std = node.input[:5]
    if any(o for o in node.output[1:]):
        needed = [o for o in node.output[1:] if o and _is_consumed(ctx, o)]
        if needed:
            raise LoweringError(f"node {node.name!r}: scale/bias gradients requested ({needed})")
    axis = attrs(node).get("axis", -1)
    rank = ctx.rank(x)
    if rank is None:
        raise LoweringError(f"node {node.name!r}: LayerNormalization gradient needs the rank of {x!r}")
    axes = list(range(axis % rank, rank))
    n = ctx.fresh
    xc, xh, g, mg, gx, mgx, t1, t2, t3 = (
        n(k) for k in ("xc", "xhat", "g", "mg", "gx", "mgx", "t1", "t2", "t3")
    )
    return [
        make("Sub", [x, mean], [xc]),
        make("Mul", [xc, inv_std], [xh]),
        make("Mul", [dy, gamma], [g]),
        _reduce(ctx, "ReduceMean", g, axes, mg),
        make("Mul", [g, xh], [gx]),
        _reduce(ctx, "ReduceMean", gx, axes, mgx),
        make("Sub", [g, mg], [t1]),
        make("Mul", [xh, mgx], [t2]),
        make("Sub", [t1, t2], [t3]),
        make("Mul", [t3, inv_std], [node.output[0]]),
    ]


def _is_consumed(ctx, name):
    return any(name in n.input for n in ctx.graph.node) or any(o.name == name for o in ctx.graph.output)


# ------------------------------------------------------------------------------------ driver


def lower(model: onnx.ModelProto, shapes: dict) -> list[str]:
    """Rewrite every training-only op of ``model`` in place. Returns the op types lowered."""
    ctx = GraphContext(model, shapes)
    out_nodes, lowered = [], []
    for node in model.graph.node:
        key = (node.domain or "", node.op_type)
        fn = LOWERINGS.get(key)
        if fn is None:
            if node.domain not in ("", "ai.onnx"):
                raise LoweringError(
                    f"node {node.name!r}: op {node.domain}::{node.op_type} from the gradient builder has "
                    "no standard-ONNX lowering; please report it with the model's op list"
                )
            out_nodes.append(node)
            continue
        new = fn(node, ctx)
        for i, nn in enumerate(new):
            if not nn.name:
                nn.name = f"{node.name}/lowered_{i}"
        out_nodes.extend(new)
        lowered.append(node.op_type)
    del model.graph.node[:]
    model.graph.node.extend(out_nodes)
    model.graph.initializer.extend(ctx.new_initializers)
    return lowered


from . import ops_gather  # noqa: E402, F401  (issue #9 §1: registers its lowerings)
