"""Lowerings of ConvGrad and ConvTransposeGrad (input gradients only; design/lowering.md, ConvGrad)."""

from __future__ import annotations

import numpy as np
import onnx

from ...errors import LoweringError
from ..graph import attrs
from .registry import lowering, make


def explicit_pads(a: dict, spatial_in: list[int] | None, kernel_eff: list[int], strides, name):
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


def transpose_to_input(ctx, dy, x, kernel, kernel_eff, strides, dilations, group, begin, out_name):
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
    begin, end = explicit_pads(a, ctx.spatial_static(x), kernel_eff, strides, node.name)
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
    return transpose_to_input(ctx, dy, x, w, kernel_eff, strides, dilations, group, begin, out)


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
