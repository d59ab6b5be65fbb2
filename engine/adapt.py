"""Any deployed ONNX classifier, not only onnxplain's exports: what can be inferred, with the reason.

Each adaptation is one small rewrite of the in-memory model (the file is never changed, and the
model's identity, ``ModelFile.sha256``, stays the digest of the bytes as deployed):

- a trailing ``Softmax`` / ``LogSoftmax`` is dropped, so the logits before it are explained and
  nothing is softmaxed twice;
- a ``uint8`` image input read through ``Cast(to=FLOAT)`` becomes a float input in [0, 255]
  (the float image after the Cast is what gradients are taken of);
- a batch axis fixed at 1 is made dynamic (Reshape targets whose leading 1 is the batch become 0,
  "copy the input's dim"); the runtime verifies the rewrite on a batch of two and falls back to
  one row per call when it changes any result;
- the layout of a rank-4 input without metadata is read from where its 1 or 3 channels are.

Every adaptation leaves a note that ``onnxplain info`` shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx
from onnx import TensorProto, numpy_helper


@dataclass
class Adapted:
    model: onnx.ModelProto
    notes: list[str] = field(default_factory=list)
    layout: tuple[str, str] | None = None  # (layout, reason) when inferred
    input_range: tuple[float, float] | None = None  # implied by the input's dtype
    fixed_batch: onnx.ModelProto | None = None  # the model before the batch rewrite, for the fallback


def adapt(model: onnx.ModelProto, input_name: str) -> Adapted:
    out = Adapted(model)
    _drop_trailing_softmax(out)
    _float_input_for_uint8(out, input_name)
    _dynamic_batch(out, input_name)
    return out


def _consumers(graph: onnx.GraphProto, name: str) -> list[onnx.NodeProto]:
    return [n for n in graph.node if name in n.input]


def _drop_trailing_softmax(out: Adapted) -> None:
    g = out.model.graph
    if len(g.output) != 1:
        return
    name = g.output[0].name
    producers = [n for n in g.node if name in n.output]
    if len(producers) != 1 or producers[0].op_type not in ("Softmax", "LogSoftmax"):
        return
    node = producers[0]
    axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
    if axis not in (-1, 1):  # a softmax over another axis is not the class axis of (N, K) logits
        return
    logits = node.input[0]
    if any(o.name == logits for o in g.output):
        return
    g.node.remove(node)
    g.output[0].name = logits  # keeps the (N, K) float type of the probabilities
    for vi in list(g.value_info):
        if vi.name == logits:
            g.value_info.remove(vi)
    out.notes.append(
        f"the model ends in {node.op_type} (node {node.name!r}): explaining the logits {logits!r} before it"
    )


def _float_input_for_uint8(out: Adapted, input_name: str) -> None:
    g = out.model.graph
    inp = next((i for i in g.input if i.name == input_name), None)
    if inp is None or inp.type.tensor_type.elem_type != TensorProto.UINT8:
        return
    users = _consumers(g, input_name)
    casts = [n for n in users if n.op_type == "Cast" and _cast_to(n) == TensorProto.FLOAT]
    if not casts or len(casts) != len(users):
        return  # used by something other than a float Cast: not an image read as bytes
    for cast in casts:
        for n in g.node:
            for i, name in enumerate(n.input):
                if name == cast.output[0]:
                    n.input[i] = input_name
        for o in g.output:
            if o.name == cast.output[0]:
                return  # degenerate: the cast itself is the output; leave the model alone
        g.node.remove(cast)
    inp.type.tensor_type.elem_type = TensorProto.FLOAT
    out.input_range = (0.0, 255.0)
    out.notes.append(
        f"input {input_name!r} is uint8 read through Cast: explaining the float image in [0, 255] "
        "after the Cast"
    )


def _cast_to(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None)


def _dynamic_batch(out: Adapted, input_name: str) -> None:
    g = out.model.graph
    inp = next((i for i in g.input if i.name == input_name), None)
    dims = inp.type.tensor_type.shape.dim if inp is not None else []
    if not dims or not dims[0].HasField("dim_value") or dims[0].dim_value != 1:
        return
    out.fixed_batch = onnx.ModelProto()
    out.fixed_batch.CopyFrom(out.model)
    dims[0].dim_param = "N"  # clears dim_value (a oneof)
    for o in g.output:
        odims = o.type.tensor_type.shape.dim
        if odims and odims[0].HasField("dim_value") and odims[0].dim_value == 1:
            odims[0].dim_param = "N"
    del g.value_info[:]  # intermediate shapes were inferred for batch 1
    inits = {t.name: t for t in g.initializer}
    for n in g.node:
        if n.op_type != "Reshape" or len(n.input) < 2 or n.input[1] not in inits:
            continue
        if any(a.name == "allowzero" and a.i for a in n.attribute):
            continue
        t = inits[n.input[1]]
        shape = numpy_helper.to_array(t)
        users = [m for m in g.node if t.name in m.input]
        if (
            shape.ndim == 1
            and len(shape) >= 1
            and shape[0] == 1
            and all(m.op_type == "Reshape" for m in users)
        ):
            shape = shape.copy()
            shape[0] = 0
            t.CopyFrom(numpy_helper.from_array(shape, t.name))
    out.notes.append("the batch axis was fixed at 1: made dynamic (verified on a batch of two at load)")


def infer_layout(dims: list) -> tuple[str | None, str]:
    """(layout, reason) for a rank-4 input (batch first) without layout metadata."""
    if len(dims) != 4:
        return None, f"input rank {len(dims)} is not an image batch (N, C, H, W) or (N, H, W, C)"
    c_first, c_last = dims[1] in (1, 3), dims[3] in (1, 3)
    if c_first and not c_last:
        return "NCHW", f"input shape {dims}: {dims[1]} channels on axis 1"
    if c_last and not c_first:
        return "NHWC", f"input shape {dims}: {dims[3]} channels on the last axis"
    if c_first and c_last:
        return None, f"input shape {dims} is ambiguous (1 or 3 on both axis 1 and the last axis)"
    return None, f"input shape {dims} has no axis of 1 or 3 channels"
