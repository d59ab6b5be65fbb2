"""Constant folding before the build: computed padding (with onnxruntime's basic optimiser) and
subgraphs whose inputs are all initializers (with onnx's reference evaluator)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..domains import STANDARD_DOMAINS
from ..graph import GraphContext, eliminate_dead_code, topological_sort
from ..scratch import scratch_dir


def fold_constant_subgraphs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold shape arithmetic with onnxruntime's basic optimiser when padding is computed in the
    graph (Shape -> ... -> Pad, as in EfficientNet-Lite's "same" padding): the builder then sees
    constant pads (fused into Conv) and static spatial dims, so ConvGrad takes the fast path."""
    pads_computed = any(
        n.op_type == "Pad" and len(n.input) > 1 and not _is_constant(model, n.input[1])
        for n in model.graph.node
    )
    if not pads_computed:
        return model
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.log_severity_level = 3
    with scratch_dir("fold-") as tmp:
        so.optimized_model_filepath = str(Path(tmp) / "folded.onnx")
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        folded = onnx.load(so.optimized_model_filepath)
    folded.ir_version = min(folded.ir_version, model.ir_version)
    return folded


def _is_constant(model, name) -> bool:
    return GraphContext(model, {}).const_value(name) is not None


# Ops never folded: random draws, and ops carrying subgraphs (control flow is refused anyway).
_UNFOLDABLE = {
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
}
# A folded tensor may be this many times larger than the initializers it is computed from (plus a
# floor), so that folding an Expand or Tile of a small constant cannot bloat the model.
_FOLD_GROWTH, _FOLD_FLOOR = 4, 1 << 16


def fold_constant_nodes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Evaluate the nodes whose inputs are all constants with onnx's reference evaluator and
    replace what they feed into the rest of the graph by initializers.

    timm's ScaledStdConv2d and the NF-Nets standardise their weights in the graph (a training-mode
    BatchNormalization over the weight tensor): the builder sees no constant there, and the
    BatchNormalization rewrite cannot read its statistics. Unlike onnxruntime's optimiser this
    touches nothing else (no fusions), so tensor names, Grad-CAM taps included, are kept.
    Returns the model and how many tensors were folded."""
    g = model.graph
    # an initializer that is also a graph input can be overridden at run time: not a constant
    const = {i.name for i in g.initializer} - {i.name for i in g.input}
    foldable = []
    for node in g.node:
        if node.op_type in _UNFOLDABLE or node.domain not in STANDARD_DOMAINS:
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            continue
        if all(i in const for i in node.input if i):
            foldable.append(node)
            const.update(o for o in node.output if o)
    computed = {o for n in foldable if n.op_type not in ("Constant", "Identity") for o in n.output if o}
    if not computed:
        return model, 0
    folded_outputs = {o for n in foldable for o in n.output if o}
    folded_ids = {id(n) for n in foldable}
    consumed = {i for n in g.node if id(n) not in folded_ids for i in n.input} | {o.name for o in g.output}
    # what the rest of the graph reads from a computed constant subgraph
    wanted = sorted(
        o for o in folded_outputs & consumed if o in computed or _upstream_computed(o, foldable, computed)
    )
    if not wanted:
        return model, 0
    from onnx.reference import ReferenceEvaluator

    sub = helper.make_graph(
        foldable,
        "constants",
        [],
        [helper.make_empty_tensor_value_info(o) for o in wanted],
        [i for i in g.initializer],
    )
    sub_model = helper.make_model(sub, opset_imports=list(model.opset_import))
    sub_model.ir_version = model.ir_version
    try:
        values = ReferenceEvaluator(sub_model).run(None, {})
    except Exception:  # an op the evaluator lacks: leave the graph as it is, the builder decides
        return model, 0
    source_size = sum(int(np.prod(i.dims)) for i in g.initializer)
    limit = max(_FOLD_FLOOR, _FOLD_GROWTH * source_size)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    count = 0
    for name, value in zip(wanted, values):
        value = np.asarray(value)
        if value.size > limit:
            continue
        m.graph.initializer.append(numpy_helper.from_array(value, name))
        count += 1
    if not count:
        return model, 0
    # drop the producers of the folded tensors (dead-code elimination drops what fed them)
    folded = {i.name for i in m.graph.initializer}
    used = {i for n in m.graph.node for i in n.input} | {o.name for o in m.graph.output}
    nodes = [n for n in m.graph.node if not all(o in folded or o not in used for o in n.output)]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    eliminate_dead_code(m)
    try:  # a partial fold must leave a well-formed graph, else keep the original
        topological_sort(m)
    except ValueError:
        return model, 0
    return m, count


def _upstream_computed(name, foldable, computed) -> bool:
    """Whether ``name`` (an Identity/Constant output) depends on a computed tensor."""
    producers = {o: n for n in foldable for o in n.output if o}
    stack, seen = [name], set()
    while stack:
        t = stack.pop()
        if t in computed:
            return True
        if t in seen or t not in producers:
            continue
        seen.add(t)
        stack.extend(i for i in producers[t].input if i)
    return False
