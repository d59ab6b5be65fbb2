"""Quantized models (QDQ format): gradients through a straight-through estimator.

An int8 model made by ``onnxruntime.quantization`` in QDQ format wraps activations in
``QuantizeLinear -> DequantizeLinear`` pairs. Rounding has a zero derivative almost everywhere, so
onnxruntime-training registers no gradient for these ops and the input is unreachable. The
straight-through estimator (Bengio et al. 2013, the convention of quantization-aware training)
takes the forward value of the pair and the backward pass of an identity: d qdq(x) / dx := 1.

Done in two steps around the builder: :func:`bypass` replaces each activation pair by
``x · in_range(x)`` (so the builder differentiates through it), and :func:`restore` puts the
original pair back into the forward part of the built graph in place of that product: the
gradient model then computes every activation exactly as the quantized model does (the backward
pass reads them) and passes the incoming gradient through each pair where it does not clamp
(the clipped straight-through estimator of PyTorch's FakeQuantize). Pairs on constants (the
weights) are left alone: they are not on the path from the input.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

PREFIX = "onnxplain/ste/"


Pairs = list[tuple[onnx.NodeProto, onnx.NodeProto]]
_RANGE = {TensorProto.UINT8: (0, 255), TensorProto.INT8: (-128, 127), TensorProto.UINT16: (0, 65535),
          TensorProto.INT16: (-32768, 32767)}  # fmt: skip


def bypass(model: onnx.ModelProto) -> tuple[onnx.ModelProto, Pairs, list[onnx.TensorProto]]:
    """A copy of ``model`` with each activation Q -> DQ pair replaced by x · in_range(x), the pairs,
    and the scale and zero-point tensors they read (the builder drops initializers no node uses).

    in_range(x) is 1 where round(x / scale) + zero_point lies inside the integer range and 0 where
    the pair clamps (PyTorch's FakeQuantize backward): the clamp at zero of a uint8 activation is
    the ReLU that the quantizer folded into it, so the gradient keeps that ReLU's mask. The mask
    comes from comparisons, which carry no gradient, so the builder differentiates only the Mul."""
    inits = {i.name: i for i in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    graph_outputs = {o.name for o in model.graph.output}
    pairs, bounds = [], []
    for q in model.graph.node:
        if q.op_type != "QuantizeLinear" or q.input[0] in inits or len(q.input) < 3:
            continue
        users = consumers.get(q.output[0], [])
        if len(users) != 1 or users[0].op_type != "DequantizeLinear" or q.output[0] in graph_outputs:
            continue  # a quantized tensor used as such: not a fake-quantization pair
        scale, zp = inits.get(q.input[1]), inits.get(q.input[2])
        if scale is None or zp is None or zp.data_type not in _RANGE:
            continue
        s, z = numpy_helper.to_array(scale), numpy_helper.to_array(zp)
        if s.size != 1 or z.size != 1:
            continue  # per-channel activation scales: left to the builder (its error names the node)
        qmin, qmax = _RANGE[zp.data_type]
        s, z = float(s.ravel()[0]), float(z.ravel()[0])
        # round(x/s) + z in [qmin, qmax]  <=>  x in [(qmin - z - 0.5) s, (qmax - z + 0.5) s]
        bounds.append(((qmin - z - 0.5) * s, (qmax - z + 0.5) * s))
        pairs.append((q, users[0]))
    if not pairs:
        return model, [], []
    m = onnx.ModelProto()
    m.CopyFrom(model)
    dropped = {id(n) for pair in pairs for n in pair}
    by_dq = {id(dq): (k, q, dq) for k, (q, dq) in enumerate(pairs)}
    nodes, extra = [], []
    for n in model.graph.node:
        if id(n) in by_dq:
            k, q, dq = by_dq[id(n)]
            x, p = q.input[0], f"{PREFIX}{k}/"
            lo, hi = bounds[k]
            extra += [
                numpy_helper.from_array(np.array(lo, np.float32), p + "lo"),
                numpy_helper.from_array(np.array(hi, np.float32), p + "hi"),
            ]
            nodes += [
                helper.make_node("GreaterOrEqual", [x, p + "lo"], [p + "ge"], name=p + "ge"),
                helper.make_node("LessOrEqual", [x, p + "hi"], [p + "le"], name=p + "le"),
                helper.make_node("And", [p + "ge", p + "le"], [p + "in"], name=p + "in"),
                helper.make_node("Cast", [p + "in"], [p + "mask"], name=p + "mask", to=TensorProto.FLOAT),
                helper.make_node("Mul", [x, p + "mask"], [dq.output[0]], name=f"{PREFIX}{k}"),
            ]
        elif id(n) not in dropped:
            nodes.append(n)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    m.graph.initializer.extend(extra)
    needed = {name for q, dq in pairs for name in list(q.input[1:]) + list(dq.input[1:]) if name}
    tensors = [t for t in model.graph.initializer if t.name in needed]
    return m, pairs, tensors


def restore(built: onnx.ModelProto, pairs: Pairs, tensors: list[onnx.TensorProto]) -> int:
    """Put each pair back in place of its forward Mul (matched by output tensor, which the builder
    keeps) with the tensors it reads; returns how many were restored. The mask and the gradient
    nodes the builder made for the Mul stay: the backward pass is dY · mask."""
    by_output = {dq.output[0]: (q, dq) for q, dq in pairs}
    nodes, restored = [], 0
    for n in built.graph.node:
        pair = by_output.get(n.output[0]) if n.op_type == "Mul" and len(n.output) == 1 else None
        if pair is not None and n.input[0] == pair[0].input[0] and n.name.startswith(PREFIX):
            q, dq = (onnx.NodeProto(), onnx.NodeProto())
            q.CopyFrom(pair[0])
            dq.CopyFrom(pair[1])
            nodes += [q, dq]
            restored += 1
        else:
            nodes.append(n)
    del built.graph.node[:]
    built.graph.node.extend(nodes)
    have = {t.name for t in built.graph.initializer}
    built.graph.initializer.extend(t for t in tensors if t.name not in have)
    return restored
