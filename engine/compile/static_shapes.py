"""Static shapes the lowering needs and onnx's shape inference does not give (issue #9 §1, §2).

Two gaps, each filled only where inference left a dim open:

- Forward tensors after a Reshape to a computed shape (timm's resnest split attention reshapes to
  ``(B, radix, RC // radix, H, W)`` read from ``x.shape``): inference loses the channel and spatial
  sizes, and the AveragePool gradient needs them. ``measure`` runs the forward graph with onnxruntime
  at batch 1 and batch 2 and keeps every dim that is the same in both runs (a dim that differs
  follows the batch and stays symbolic). Only when the model's input is static apart from its batch.
- Gradient tensors inside the builder's MatMul gradient (``PreReduceGrad``: dY·Bᵀ before the
  reduction over broadcast axes): the builder writes no value_info for them, so the
  BroadcastGradientArgs axes were computed at run time (NonZero), which OpenVINO refuses (it needs
  reduction axes of static length). ``propagate`` derives their shapes from their inputs' with the
  shape rules of the few ops that produce them (MatMul, FusedMatMul, Transpose, element-wise ops
  and the builder's same-shape gradient ops), with the symbols of the forward shapes, so the
  lowering's ``_static_broadcast_axes`` can decide the axes at compile time.
"""

from __future__ import annotations

import numpy as np
import onnx

from .graph import attrs

_SAME_SHAPE = {
    "Identity",
    "Neg",
    "Cast",
    "Relu",
    "Sigmoid",
    "Tanh",
    "Exp",
    "Log",
    "Sqrt",
    "Erf",
    "Abs",
    "Reciprocal",
    "Not",
    "Softmax",
    "LogSoftmax",
    "Scale",
    "SoftmaxGrad_13",
    "LogSoftmaxGrad_13",
    "SigmoidGrad",
    "TanhGrad",
    "GeluGrad",
    "FastGeluGrad",
    "ReluGrad",
    "LeakyReluGrad",
    "QuickGeluGrad",
}
_BROADCAST = {"Add", "Sub", "Mul", "Div", "Pow", "Sum", "Max", "Min", "Where", "Equal", "Greater", "Less"}


def _known(dims) -> bool:
    return dims is not None and all(d is not None for d in dims)


def _broadcast(shapes) -> list | None:
    rank = max(len(s) for s in shapes)
    padded = [[1] * (rank - len(s)) + list(s) for s in shapes]
    out = []
    for col in zip(*padded):
        rest = {d for d in col if d != 1}
        if not rest:
            out.append(1)
        elif len(rest) == 1:
            out.append(rest.pop())
        else:
            ints = {d for d in rest if isinstance(d, int)}
            if len(ints) != 1:
                return None  # two symbols, or two different sizes: leave it open
            out.append(ints.pop())  # a symbol against n: n (or the runtime's own error)
    return out


def _matmul(a, b, trans_a=0, trans_b=0) -> list | None:
    if len(a) < 2 or len(b) < 2:
        return None
    a, b = list(a), list(b)
    if trans_a:
        a[-2], a[-1] = a[-1], a[-2]
    if trans_b:
        b[-2], b[-1] = b[-1], b[-2]
    batch = _broadcast([a[:-2], b[:-2]]) if (a[:-2] or b[:-2]) else []
    return None if batch is None else batch + [a[-2], b[-1]]


def _infer_node(node, shapes) -> list | None:
    ins = [shapes.get(i) if i else None for i in node.input]
    op = node.op_type
    if op in _SAME_SHAPE:
        return list(ins[0]) if _known(ins[0]) else None
    if not all(_known(s) for s in ins if s is not None) or any(s is None for s in ins):
        return None
    if op in _BROADCAST:
        return _broadcast(ins)
    if op == "MatMul":
        return _matmul(ins[0], ins[1])
    if op == "FusedMatMul":
        a = attrs(node)
        if a.get("transBatchA", 0) or a.get("transBatchB", 0):
            return None
        return _matmul(ins[0], ins[1], a.get("transA", 0), a.get("transB", 0))
    if op == "Transpose":
        perm = attrs(node).get("perm", list(range(len(ins[0])))[::-1])
        return [ins[0][p] for p in perm]
    return None


def propagate(model: onnx.ModelProto, shapes: dict) -> int:
    """Fill in ``shapes`` for outputs of ``model``'s nodes that have none, from their inputs'.
    Returns how many were added."""
    added = 0
    for node in model.graph.node:
        if len(node.output) != 1 or not node.output[0] or _known(shapes.get(node.output[0])):
            continue
        dims = _infer_node(node, shapes)
        if dims is not None:
            shapes[node.output[0]] = dims
            added += 1
    return added


def _open(dims) -> bool:
    """A dim after the first one that inference did not give as an integer."""
    return dims is None or any(not isinstance(d, int) for d in dims[1:])


def measure(fwd: onnx.ModelProto, input_name: str, shapes: dict, wanted=None) -> int:
    """Complete the open dims of the forward tensors in ``wanted`` (default: every tensor consumed
    by an AveragePool) by running ``fwd`` at batch 1 and 2. Returns how many tensors changed."""
    g = fwd.graph
    if wanted is None:
        wanted = {n.input[0] for n in g.node if n.op_type == "AveragePool"}
    wanted = sorted(t for t in wanted if _open(shapes.get(t)))
    inp = next((i for i in g.input if i.name == input_name), None)
    dims = shapes.get(input_name)
    if not wanted or inp is None or dims is None or any(not isinstance(d, int) for d in dims[1:]):
        return 0
    batches = (dims[0],) if isinstance(dims[0], int) else (1, 2)  # a fixed batch: run it once
    elem = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
    m = onnx.ModelProto()
    m.CopyFrom(fwd)
    outs = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in wanted if t not in outs)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        runs = [sess.run(wanted, _feeds(g, input_name, dims, b, elem, rng)) for b in batches]
    except Exception:  # a shape convenience: without it the lowering refuses with its own message
        return 0
    changed = 0
    for k, name in enumerate(wanted):
        one, two = runs[0][k].shape, runs[-1][k].shape
        if len(one) != len(two):
            continue
        old = shapes.get(name) or [None] * len(one)
        if len(old) != len(one):
            continue
        shapes[name] = [
            a if a == b else (o if isinstance(o, str) else f"measured_batch_{k}")
            for a, b, o in zip(one, two, old)
        ]
        changed += 1
    return changed


def _feeds(g, input_name, dims, batch, elem, rng) -> dict:
    """Random input at ``batch``; zeros for the other inputs (the loss head's class weights and
    output mix), their symbolic dims taken as the batch."""
    feeds = {input_name: rng.uniform(0, 1, (batch, *dims[1:])).astype(elem)}
    for i in g.input:
        if i.name == input_name:
            continue
        t = i.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in t.shape.dim]
        feeds[i.name] = np.zeros(shape, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))
    return feeds


def complete(fwd, built, shapes: dict, input_name: str, gradient_name) -> None:
    """``measure`` (AveragePool inputs, and forward tensors whose Shape the builder's broadcast
    gradients read) then ``propagate``, keeping a gradient's shape equal to its tensor's."""
    produced = {o for n in fwd.graph.node for o in n.output}
    wanted = {n.input[0] for n in fwd.graph.node if n.op_type == "AveragePool"}
    by_output = {o: n for n in built.graph.node for o in n.output}
    for n in built.graph.node:
        if n.op_type in ("BroadcastGradientArgs", "DivGrad"):
            for i in n.input:
                src = by_output.get(i)
                wanted.add(src.input[0] if src is not None and src.op_type == "Shape" else i)
    measure(fwd, input_name, shapes, wanted & produced)
    for name in list(shapes):
        grad = gradient_name(name)
        if grad not in shapes or not _known(shapes[grad]):
            shapes[grad] = shapes[name]
    propagate(built, shapes)


def unknown_pool_dims(model: onnx.ModelProto) -> list[str]:
    """AveragePools whose input dims shape inference does not give: the builder's AveragePoolGrad
    kernel takes its output shape from the graph and fails there (an Expand downstream reports an
    invalid shape), so the self-check cannot run the builder's graph (the lowering, which measures
    the dims, is checked against torch in tests/test_coverage_ops.py)."""
    from .graph import infer_shapes

    pools = [n for n in model.graph.node if n.op_type == "AveragePool"]
    if not pools:
        return []
    shapes = infer_shapes(model)
    return [
        f"{n.name}: AveragePool input dims unknown to shape inference (the builder's kernel needs them)"
        for n in pools
        if _open(shapes.get(n.input[0]))
    ]


def drop_empty_reductions(model: onnx.ModelProto) -> int:
    """ReduceSum(x, axes=[]) with noop_with_empty_axes=1 is x: replace it by Identity. Static
    broadcast axes are often empty (no broadcast), and OpenVINO 2026.4 ignores
    noop_with_empty_axes and sums over every axis (a transformer's gradients were wrong by 190%).
    Returns how many were replaced."""
    from .graph import GraphContext

    ctx = GraphContext(model, {})
    count = 0
    for i, node in enumerate(model.graph.node):
        if node.op_type != "ReduceSum" or len(node.input) < 2 or not node.input[1]:
            continue
        if not attrs(node).get("noop_with_empty_axes", 0):
            continue
        axes = ctx.const_value(node.input[1])
        if axes is None or axes.size:
            continue
        ident = onnx.helper.make_node("Identity", [node.input[0]], list(node.output), name=node.name)
        model.graph.node[i].CopyFrom(ident)
        count += 1
    return count


TRANSPOSED_HINT = "const_transposed"  # engine.initializers recomputes these from replaced weights


def fold_constant_transposes(model: onnx.ModelProto) -> int:
    """Transpose of an initializer -> a transposed initializer (named with TRANSPOSED_HINT, so
    ``engine.initializers`` finds it and recomputes it when weights are replaced). The lowered
    MatMul gradients multiply by Wᵀ through Transpose(W) while the forward MatMul reads W itself;
    OpenVINO 2026.4's CPU plugin computes that second MatMul wrong (34% of scale on a small ViT)
    when both share the constant. A constant of its own is exact on every runtime (onnxruntime
    folds the Transpose anyway). Returns how many were folded."""
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    graph_inputs = {i.name for i in g.input}
    used = {n for node in g.node for n in (*node.input, *node.output)} | set(inits)
    renamed: dict[str, str] = {}
    keep = []
    for node in g.node:
        if node.op_type != "Transpose" or node.input[0] not in inits or node.input[0] in graph_inputs:
            keep.append(node)
            continue
        value = numpy_helper.to_array(inits[node.input[0]])
        perm = attrs(node).get("perm", list(range(value.ndim))[::-1])
        k = len(renamed)
        while f"onnxplain/{TRANSPOSED_HINT}_{k}" in used:
            k += 1
        name = f"onnxplain/{TRANSPOSED_HINT}_{k}"
        used.add(name)
        renamed[node.output[0]] = name
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value.transpose(perm)), name))
    if not renamed or any(o.name in renamed for o in g.output):
        return 0 if not renamed else _undo(model, renamed)
    for node in keep:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    del g.node[:]
    g.node.extend(keep)
    return len(renamed)


def _undo(model, renamed) -> int:
    """A transposed constant that is itself a graph output: leave the graph as it was."""
    inits = [i for i in model.graph.initializer if i.name not in set(renamed.values())]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    return 0


def portable(model: onnx.ModelProto) -> dict:
    """The fix-ups after lowering that make the graph exact on OpenVINO too."""
    return {
        "empty_reductions": drop_empty_reductions(model),
        "constant_transposes": fold_constant_transposes(model),
    }
