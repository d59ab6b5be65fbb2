"""Forward-graph rewrites for what GradientGraphBuilder 1.19.2 cannot differentiate or gets wrong.

See design/lowering.md, "Builder pitfalls". Every rewrite keeps the forward values bit-for-bit or
to float rounding; tests compare the rewritten forward graph with the original.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper, version_converter

from ..errors import UnsupportedModelError
from .graph import GraphContext, attrs, eliminate_dead_code, infer_shapes, opset_version, topological_sort
from .scratch import scratch_dir

MIN_OPSET, MAX_OPSET = 13, 21
# ScatterElements(reduction="add"), used by the pooling and gather lowerings, needs opset 16.
TARGET_MIN_OPSET = 16


# Ops with no gradient in the builder and no rewrite here, with the advice given to the user.
REFUSED = {
    "Upsample": "as Resize: resize outside the model",
    "Loop": "control flow cannot be differentiated; export a model without Loop",
    "If": "control flow cannot be differentiated; export with constant conditions folded",
    "Scan": "control flow cannot be differentiated",
    "ArgMax": "ArgMax has no gradient; export the logits, not the predicted index",
    "TopK": "TopK has no gradient; export the logits",
    "NonMaxSuppression": "detection post-processing is not a classifier output",
}


def upgrade_opset(model: onnx.ModelProto, where: str) -> onnx.ModelProto:
    version = opset_version(model)
    if version < MIN_OPSET:
        raise UnsupportedModelError(
            f"{where}: opset {version} is older than {MIN_OPSET} (Softmax semantics changed at 13); "
            f"re-export the model with opset >= {MIN_OPSET}"
        )
    if version > MAX_OPSET:
        raise UnsupportedModelError(
            f"{where}: opset {version} is newer than {MAX_OPSET}, the last one onnxruntime-training "
            f"1.19.2 reads; re-export with opset <= {MAX_OPSET}"
        )
    if version < TARGET_MIN_OPSET:
        try:
            model = version_converter.convert_version(model, TARGET_MIN_OPSET)
        except Exception as e:
            raise UnsupportedModelError(
                f"{where}: could not raise opset {version} to {TARGET_MIN_OPSET} ({e}); "
                f"re-export with opset >= {TARGET_MIN_OPSET}"
            ) from e
    return model


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
        if node.op_type in _UNFOLDABLE or node.domain not in ("", "ai.onnx"):
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


def prepass(model: onnx.ModelProto, input_name: str, where: str = "model") -> onnx.ModelProto:
    """Return a rewritten copy of ``model`` ready for the builder."""
    model = fold_constant_subgraphs(upgrade_opset(model, where))
    model, _ = fold_constant_nodes(model)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for node in m.graph.node:
        if node.op_type in REFUSED and node.domain in ("", "ai.onnx"):
            raise UnsupportedModelError(
                f"{where}: node {node.name!r} (op {node.op_type}) cannot be differentiated: "
                f"{REFUSED[node.op_type]}"
            )
        if node.domain not in ("", "ai.onnx"):
            raise UnsupportedModelError(
                f"{where}: node {node.name!r} uses op {node.domain}::{node.op_type} outside the "
                "standard ONNX domain; export with standard ops only"
            )
    ctx = GraphContext(m, infer_shapes(m))
    new_nodes = []
    for node in m.graph.node:
        rewrite = _REWRITES.get(node.op_type)
        new_nodes.extend(rewrite(node, ctx, where) if rewrite else [node])
    del m.graph.node[:]
    m.graph.node.extend(new_nodes)
    m.graph.initializer.extend(ctx.new_initializers)
    _isolate_input(m, input_name)
    return m


def _isolate_input(m: onnx.ModelProto, input_name: str) -> None:
    """Feed the input through an Identity: a node like Mul(x, x) directly on a graph input makes
    the builder emit a duplicate x_grad."""
    alias = "onnxplain/input_identity"
    for node in m.graph.node:
        for i, name in enumerate(node.input):
            if name == input_name:
                node.input[i] = alias
    m.graph.node.insert(0, helper.make_node("Identity", [input_name], [alias], name=alias))


def batchnorm_factors(gamma, beta, mean, var, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Eval-mode BatchNormalization as y = a·x + b: (a, b) float32, computed in float64. Also
    used by ``engine.initializers`` to recompute them from replaced weights."""
    gamma, beta, mu, sigma2 = (np.asarray(v, np.float64) for v in (gamma, beta, mean, var))
    a = gamma / np.sqrt(sigma2 + eps)
    b = beta - mu * a
    return a.astype(np.float32), b.astype(np.float32)


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


def _gelu(node, ctx, where):
    """Gelu-20: the builder gives the tanh form the erf gradient, so decompose both forms."""
    (x,) = node.input[:1]
    approx = attrs(node).get("approximate", b"none")
    approx = approx.decode() if isinstance(approx, bytes) else approx
    c = lambda v: ctx.const(np.float32(v))  # noqa: E731
    f = ctx.fresh
    half_x, inner, s, out = f("half_x"), f("inner"), f("s"), node.output[0]
    nodes = [helper.make_node("Mul", [x, c(0.5)], [half_x])]
    if approx == "tanh":
        x3, cubic, u = f("x3"), f("cubic"), f("u")
        nodes += [
            helper.make_node("Pow", [x, c(3.0)], [x3]),
            helper.make_node("Mul", [x3, c(0.044715)], [cubic]),
            helper.make_node("Add", [x, cubic], [inner]),
            helper.make_node("Mul", [inner, c(math.sqrt(2 / math.pi))], [u]),
            helper.make_node("Tanh", [u], [s]),
        ]
    else:
        nodes += [
            helper.make_node("Mul", [x, c(1 / math.sqrt(2))], [inner]),
            helper.make_node("Erf", [inner], [s]),
        ]
    one_plus = f("one_plus")
    nodes += [
        helper.make_node("Add", [s, c(1.0)], [one_plus]),
        helper.make_node("Mul", [half_x, one_plus], [out]),
    ]
    return nodes


def _reduce_max(node, ctx, where, op="ReduceMax"):
    """ReduceMax (and ReduceMin) have no gradient: ReduceSum(x * mask) / count with
    mask = (x == max). Ties share the gradient evenly (torch.amax / amin semantics)."""
    a = attrs(node)
    keepdims = a.get("keepdims", 1)
    axes_inputs = list(node.input[1:2])
    f = ctx.fresh
    mx, eq, mask, masked, num, cnt = f("max"), f("eq"), f("mask"), f("masked"), f("num"), f("count")
    red_kw = {"keepdims": 1}
    reduce_inputs = axes_inputs
    if "axes" in a:  # opset < 18: axes attribute; ReduceSum takes them as an input from 13
        reduce_inputs = [ctx.const(np.array(a["axes"], np.int64), "axes")]
        max_node = helper.make_node(op, [node.input[0]], [mx], axes=a["axes"], keepdims=1)
    else:
        max_node = helper.make_node(op, [node.input[0], *axes_inputs], [mx], keepdims=1)
    nodes = [
        max_node,
        helper.make_node("Equal", [node.input[0], mx], [eq]),
        helper.make_node("Cast", [eq], [mask], to=onnx.TensorProto.FLOAT),
        helper.make_node("Mul", [node.input[0], mask], [masked]),
        helper.make_node("ReduceSum", [masked, *reduce_inputs], [num], **red_kw),
        helper.make_node("ReduceSum", [mask, *reduce_inputs], [cnt], **red_kw),
    ]
    if keepdims:
        nodes.append(helper.make_node("Div", [num, cnt], [node.output[0]]))
    else:
        div = f("div")
        squeeze_axes = reduce_inputs or []
        nodes.append(helper.make_node("Div", [num, cnt], [div]))
        if squeeze_axes:
            nodes.append(helper.make_node("Squeeze", [div, *squeeze_axes], [node.output[0]]))
        else:  # all axes reduced
            nodes.append(
                helper.make_node("Reshape", [div, ctx.const(np.array([], np.int64))], [node.output[0]])
            )
    return nodes


def _reduce_min(node, ctx, where):
    return _reduce_max(node, ctx, where, op="ReduceMin")


def _reduce_l1(node, ctx, where):
    """ReduceL1 = ReduceSum(|x|) with the same axes and keepdims (derivative sign(x), 0 at 0)."""
    ab = ctx.fresh("abs")
    a = attrs(node)
    kw = {k: a[k] for k in ("keepdims", "noop_with_empty_axes") if k in a}
    axes_inputs = list(node.input[1:2])
    if "axes" in a:  # opset < 18: an attribute; ReduceSum takes axes as an input from opset 13
        axes_inputs = [ctx.const(np.array(a["axes"], np.int64), "axes")]
    return [
        helper.make_node("Abs", [node.input[0]], [ab]),
        helper.make_node("ReduceSum", [ab, *axes_inputs], [node.output[0]], **kw),
    ]


def _sign(node, ctx, where):
    """Sign is piecewise constant (derivative 0, as in torch) but has no builder gradient: select
    constants with Where, so no gradient flows through it."""
    x = node.input[0]
    gt, lt, inner = ctx.fresh("gt0"), ctx.fresh("lt0"), ctx.fresh("sign_inner")
    zero = ctx.const(np.float32(0), "zero")
    return [
        helper.make_node("Greater", [x, zero], [gt]),
        helper.make_node("Less", [x, zero], [lt]),
        helper.make_node("Where", [lt, ctx.const(np.float32(-1)), zero], [inner]),
        helper.make_node("Where", [gt, ctx.const(np.float32(1)), inner], [node.output[0]]),
    ]


def _elu(node, ctx, where):
    """Elu = Relu(x) + alpha (exp(-Relu(-x)) - 1): no Elu gradient in the builder, and this form
    never evaluates exp of a large positive number."""
    alpha = attrs(node).get("alpha", 1.0)
    x = node.input[0]
    f = ctx.fresh
    pos, negx, rn, nrn, e, em1, scaled = (f(k) for k in ("pos", "negx", "rn", "nrn", "e", "em1", "sc"))
    return [
        helper.make_node("Relu", [x], [pos]),
        helper.make_node("Neg", [x], [negx]),
        helper.make_node("Relu", [negx], [rn]),
        helper.make_node("Neg", [rn], [nrn]),
        helper.make_node("Exp", [nrn], [e]),
        helper.make_node("Sub", [e, ctx.const(np.float32(1))], [em1]),
        helper.make_node("Mul", [em1, ctx.const(np.float32(alpha))], [scaled]),
        helper.make_node("Add", [pos, scaled], [node.output[0]]),
    ]


def _hard_sigmoid_nodes(ctx, x, alpha, beta, out):
    lin, shifted = ctx.fresh("hs_lin"), ctx.fresh("hs_shift")
    return [
        helper.make_node("Mul", [x, ctx.const(np.float32(alpha))], [lin]),
        helper.make_node("Add", [lin, ctx.const(np.float32(beta))], [shifted]),
        helper.make_node("Clip", [shifted, ctx.const(np.float32(0)), ctx.const(np.float32(1))], [out]),
    ]


def _hard_sigmoid(node, ctx, where):
    a = attrs(node)
    return _hard_sigmoid_nodes(ctx, node.input[0], a.get("alpha", 0.2), a.get("beta", 0.5), node.output[0])


def _hard_swish(node, ctx, where):
    hs = ctx.fresh("hard_sigmoid")
    return _hard_sigmoid_nodes(ctx, node.input[0], 1 / 6, 0.5, hs) + [
        helper.make_node("Mul", [node.input[0], hs], [node.output[0]])
    ]


def _clip(node, ctx, where):
    """Make Clip's bounds explicit inputs so the custom gradient definitions can read I(1), I(2)."""
    inputs = list(node.input) + [""] * (3 - len(node.input))
    a = attrs(node)
    lo = a.get("min", -np.inf)
    hi = a.get("max", np.inf)
    if not inputs[1]:
        inputs[1] = ctx.const(np.float32(lo), "clip_min")
    if not inputs[2]:
        inputs[2] = ctx.const(np.float32(hi), "clip_max")
    return [helper.make_node("Clip", inputs, list(node.output), name=node.name)]


def _pad(node, ctx, where):
    """Constant padding is left to the builder. reflect, edge and wrap padding (no gradient in the
    builder) become one Gather per padded axis with constant indices: np.pad of arange(n) in the
    same mode gives, for every output position, the input position it copies (numpy's modes are
    the ONNX ones; torch's reflect, replicate and circular). Gather's gradient scatter-adds, so an
    input copied several times gets each copy's gradient."""
    mode = attrs(node).get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode == "constant":
        return [node]
    x = node.input[0]
    pads = ctx.const_value(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    dims = ctx.shapes.get(x)
    refuse = lambda why: UnsupportedModelError(  # noqa: E731
        f"{where}: node {node.name!r} (Pad, mode={mode}) cannot be differentiated: {why}"
    )
    if pads is None:
        raise refuse("its pads are computed from the input; export with constant padding")
    if dims is None:
        raise refuse(f"the rank of {x!r} is unknown")
    rank = len(dims)
    axes = list(range(rank))
    if len(node.input) > 3 and node.input[3]:
        given = ctx.const_value(node.input[3])
        if given is None:
            raise refuse("its axes are not constant")
        axes = [int(a) % rank for a in given]
    pads = [int(p) for p in pads]
    begins, ends = pads[: len(axes)], pads[len(axes) :]
    if any(p < 0 for p in pads):
        raise refuse(f"negative pads {pads} (cropping) in {mode} mode")
    numpy_mode = {"reflect": "reflect", "edge": "edge", "wrap": "wrap"}.get(mode)
    if numpy_mode is None:
        raise refuse(f"unknown mode {mode!r}")
    nodes, cur = [], x
    padded = [(a, b, e) for a, b, e in zip(axes, begins, ends) if b or e]
    for k, (axis, b, e) in enumerate(padded):
        n = dims[axis]
        if not isinstance(n, int) or n <= 0:
            raise refuse(f"dimension {axis} of {x!r} is not static; export with a fixed input size")
        if mode == "reflect" and max(b, e) >= n:
            raise refuse(f"reflect pads {b, e} on a dimension of size {n}")
        index = np.pad(np.arange(n, dtype=np.int64), (b, e), mode=numpy_mode)
        out = node.output[0] if k == len(padded) - 1 else ctx.fresh("padded")
        nodes.append(helper.make_node("Gather", [cur, ctx.const(index, "pad_index")], [out], axis=axis))
        cur = out
    if not nodes:
        return [helper.make_node("Identity", [x], [node.output[0]], name=node.name)]
    return nodes


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


def _einsum(node, ctx, where):
    """Einsum (no builder gradient) by its definition: every operand transposed and unsqueezed onto
    one axis per index letter (in a common order), multiplied with broadcasting, summed over the
    letters not in the output, transposed to the output order. Exact; the broadcast product holds
    every index combination at once, so a large contraction (attention scores written as einsum)
    needs that much memory. Repeated letters within one operand (diagonals) are refused."""
    eq = attrs(node)["equation"]
    eq = (eq.decode() if isinstance(eq, bytes) else eq).replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    refuse = lambda why: UnsupportedModelError(  # noqa: E731
        f"{where}: node {node.name!r} (Einsum {eq!r}) cannot be differentiated: {why}"
    )
    if len(terms) != len(node.input):
        raise refuse("the equation does not match the inputs")
    used = set(eq) - set(".,->")
    spare = iter(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" if c not in used)
    ellipsis = []
    if "..." in eq:  # broadcast dims: right-aligned letters shared by every operand that has them
        widths = []
        for term, x in zip(terms, node.input):
            rank = ctx.rank(x)
            if rank is None:
                raise refuse(f"the rank of {x!r} is unknown")
            widths.append(rank - len(term.replace("...", "")) if "..." in term else 0)
        ellipsis = [next(spare) for _ in range(max(widths))]
        terms = [
            t.replace("...", "".join(ellipsis[len(ellipsis) - w :])) if "..." in t else t
            for t, w in zip(terms, widths)
        ]
        rhs = rhs.replace("...", "".join(ellipsis))
    if not arrow:  # implicit output: ellipsis dims, then the letters used once, alphabetically
        counts = {c: sum(t.count(c) for t in terms) for c in set("".join(terms))}
        rhs = "".join(ellipsis) + "".join(
            sorted(c for c, k in counts.items() if k == 1 and c not in ellipsis)
        )
    if any(len(set(t)) != len(t) for t in terms):
        raise refuse("a letter repeats within one operand (a diagonal)")
    order = list(dict.fromkeys("".join(terms) + rhs))
    f = ctx.fresh
    nodes, aligned = [], []
    for term, x in zip(terms, node.input):
        present = [c for c in order if c in term]
        cur = x
        perm = [term.index(c) for c in present]
        if perm != list(range(len(perm))):
            cur_t = f("einsum_t")
            nodes.append(helper.make_node("Transpose", [cur], [cur_t], perm=perm))
            cur = cur_t
        missing = [i for i, c in enumerate(order) if c not in term]
        if missing:
            cur_u = f("einsum_u")
            nodes.append(
                helper.make_node("Unsqueeze", [cur, ctx.const(np.array(missing, np.int64), "axes")], [cur_u])
            )
            cur = cur_u
        aligned.append(cur)
    prod = aligned[0]
    for other in aligned[1:]:
        nxt = f("einsum_mul")
        nodes.append(helper.make_node("Mul", [prod, other], [nxt]))
        prod = nxt
    summed = [i for i, c in enumerate(order) if c not in rhs]
    kept = [c for c in order if c in rhs]
    if summed:
        red = f("einsum_sum")
        nodes.append(
            helper.make_node(
                "ReduceSum", [prod, ctx.const(np.array(summed, np.int64), "axes")], [red], keepdims=0
            )
        )
        prod = red
    perm = [kept.index(c) for c in rhs]
    if len(set(rhs)) != len(rhs):
        raise refuse("a letter repeats in the output")
    nodes.append(helper.make_node("Transpose", [prod], [node.output[0]], perm=perm))
    return nodes


def _depth_space(node, ctx, where):
    """DepthToSpace / SpaceToDepth (pixel shuffle; no builder gradient) as the Reshape -> Transpose ->
    Reshape of their ONNX definition; the batch stays symbolic (0 in the shapes copies it), the
    other dims must be static."""
    x = node.input[0]
    a = attrs(node)
    bs = a["blocksize"]
    dims = ctx.shapes.get(x)
    if dims is None or len(dims) != 4 or any(not isinstance(d, int) or d <= 0 for d in dims[1:]):
        raise UnsupportedModelError(
            f"{where}: node {node.name!r} ({node.op_type}) needs static channel and spatial sizes of {x!r}; "
            "export with a fixed input size"
        )
    _, c, h, w = dims
    if node.op_type == "DepthToSpace":
        mode = a.get("mode", b"DCR")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode == "DCR":
            first, perm = [0, bs, bs, c // (bs * bs), h, w], [0, 3, 4, 1, 5, 2]
        else:  # CRD
            first, perm = [0, c // (bs * bs), bs, bs, h, w], [0, 1, 4, 2, 5, 3]
        last = [0, c // (bs * bs), h * bs, w * bs]
    else:
        first, perm = [0, c, h // bs, bs, w // bs, bs], [0, 3, 5, 1, 2, 4]
        last = [0, c * bs * bs, h // bs, w // bs]
    r1, t = ctx.fresh("d2s_split"), ctx.fresh("d2s_perm")
    return [
        helper.make_node("Reshape", [x, ctx.const(np.array(first, np.int64), "shape")], [r1]),
        helper.make_node("Transpose", [r1], [t], perm=perm),
        helper.make_node("Reshape", [t, ctx.const(np.array(last, np.int64), "shape")], [node.output[0]]),
    ]


# ------------------------------------------------------------------ activations without a gradient
# The builder has no gradient for these. Each is rewritten into ops it does differentiate (Where,
# Greater, Exp, Log, Abs, Div, Tanh, Mul, Add, Sub) with the exact formula; positive parts use
# Where(x > 0, x, 0) rather than Relu, so the guided-backprop/deconvnet rules, which replace the
# gradient of Relu, stay confined to the model's own Relus. Every derivative at the kinks equals
# torch's (the side torch takes is named per function).


def _positive_part(ctx, x: str) -> tuple[list, str]:
    """max(x, 0) as Where(x > 0, x, 0): derivative 1 for x > 0, 0 at and below 0 (torch's relu)."""
    gt, pos = ctx.fresh("gt0"), ctx.fresh("pos")
    zero = ctx.const(np.float32(0), "zero")
    return [
        helper.make_node("Greater", [x, zero], [gt]),
        helper.make_node("Where", [gt, x, zero], [pos]),
    ], pos


def _softplus_nodes(ctx, x: str, out: str) -> list:
    """log(1 + e^x) = max(x, 0) + log(1 + e^(-|x|)): never exponentiates a positive number, so no
    overflow for large x; -|x| = x - 2 max(x, 0). Derivative sigmoid(x) everywhere (0.5 at 0)."""
    nodes, pos = _positive_part(ctx, x)
    f = ctx.fresh
    two_pos, neg_abs, e, one_plus, log = f("two_pos"), f("neg_abs"), f("exp"), f("one_plus"), f("log")
    return nodes + [
        helper.make_node("Mul", [pos, ctx.const(np.float32(2))], [two_pos]),
        helper.make_node("Sub", [x, two_pos], [neg_abs]),
        helper.make_node("Exp", [neg_abs], [e]),
        helper.make_node("Add", [e, ctx.const(np.float32(1))], [one_plus]),
        helper.make_node("Log", [one_plus], [log]),
        helper.make_node("Add", [pos, log], [out]),
    ]


def _softplus(node, ctx, where):
    return _softplus_nodes(ctx, node.input[0], node.output[0])


def _softsign(node, ctx, where):
    """x / (1 + |x|)."""
    ab, den = ctx.fresh("abs"), ctx.fresh("den")
    return [
        helper.make_node("Abs", [node.input[0]], [ab]),
        helper.make_node("Add", [ab, ctx.const(np.float32(1))], [den]),
        helper.make_node("Div", [node.input[0], den], [node.output[0]]),
    ]


def _mish(node, ctx, where):
    """x tanh(softplus(x)) (opset 18's Mish; torch exports the decomposed form itself)."""
    sp, t = ctx.fresh("softplus"), ctx.fresh("tanh")
    return _softplus_nodes(ctx, node.input[0], sp) + [
        helper.make_node("Tanh", [sp], [t]),
        helper.make_node("Mul", [node.input[0], t], [node.output[0]]),
    ]


def _elu_family(ctx, x: str, alpha: float, inner: float, gamma: float, out: str) -> list:
    """gamma (max(x, 0) + alpha (exp(min(x, 0) / inner) - 1)): Elu (inner = gamma = 1), Selu
    (inner = 1), Celu (inner = alpha, gamma = 1). exp only sees non-positive numbers. At x = 0 the
    derivative is gamma alpha / inner, as in torch (its elu backward takes the x <= 0 branch)."""
    nodes, pos = _positive_part(ctx, x)
    f = ctx.fresh
    neg, e, em1, scaled, total = f("neg"), f("exp"), f("em1"), f("scaled"), f("elu")
    neg_in = neg
    nodes += [helper.make_node("Sub", [x, pos], [neg])]
    if inner != 1.0:
        neg_in = f("neg_scaled")
        nodes.append(helper.make_node("Mul", [neg, ctx.const(np.float32(1 / inner))], [neg_in]))
    nodes += [
        helper.make_node("Exp", [neg_in], [e]),
        helper.make_node("Sub", [e, ctx.const(np.float32(1))], [em1]),
        helper.make_node("Mul", [em1, ctx.const(np.float32(alpha))], [scaled]),
        helper.make_node("Add", [pos, scaled], [total if gamma != 1.0 else out]),
    ]
    if gamma != 1.0:
        nodes.append(helper.make_node("Mul", [total, ctx.const(np.float32(gamma))], [out]))
    return nodes


def _selu(node, ctx, where):
    a = attrs(node)
    alpha = a.get("alpha", 1.67326319217681884765625)
    gamma = a.get("gamma", 1.05070102214813232421875)
    return _elu_family(ctx, node.input[0], alpha, 1.0, gamma, node.output[0])


def _celu(node, ctx, where):
    alpha = attrs(node).get("alpha", 1.0)
    return _elu_family(ctx, node.input[0], alpha, alpha, 1.0, node.output[0])


def _thresholded_relu(node, ctx, where):
    """x if x > alpha else 0: Where(x > alpha, x, 0)."""
    alpha = attrs(node).get("alpha", 1.0)
    gt = ctx.fresh("gt_alpha")
    return [
        helper.make_node("Greater", [node.input[0], ctx.const(np.float32(alpha), "alpha")], [gt]),
        helper.make_node("Where", [gt, node.input[0], ctx.const(np.float32(0), "zero")], [node.output[0]]),
    ]


def _prelu(node, ctx, where):
    """Where(x > 0, x, slope x): derivative slope at x = 0, as torch's prelu backward."""
    x, slope = node.input[:2]
    gt, scaled = ctx.fresh("gt0"), ctx.fresh("prelu_neg")
    return [
        helper.make_node("Greater", [x, ctx.const(np.float32(0), "zero")], [gt]),
        helper.make_node("Mul", [x, slope], [scaled]),
        helper.make_node("Where", [gt, x, scaled], [node.output[0]]),
    ]


def _shrink(node, ctx, where):
    """Shrink: x + bias for x < -lambd, x - bias for x > lambd, else 0."""
    a = attrs(node)
    lambd, bias = a.get("lambd", 0.5), a.get("bias", 0.0)
    x = node.input[0]
    f = ctx.fresh
    lo, hi, plus, minus, inner = f("lt"), f("gt"), f("plus"), f("minus"), f("inner")
    c = lambda v: ctx.const(np.float32(v))  # noqa: E731
    return [
        helper.make_node("Less", [x, c(-lambd)], [lo]),
        helper.make_node("Greater", [x, c(lambd)], [hi]),
        helper.make_node("Add", [x, c(bias)], [plus]),
        helper.make_node("Sub", [x, c(bias)], [minus]),
        helper.make_node("Where", [hi, minus, c(0.0)], [inner]),
        helper.make_node("Where", [lo, plus, inner], [node.output[0]]),
    ]


_REWRITES = {
    "BatchNormalization": _batchnorm,
    "LayerNormalization": _layernorm,
    "Gelu": _gelu,
    "ReduceMax": _reduce_max,
    "ReduceMin": _reduce_min,
    "ReduceL1": _reduce_l1,
    "Sign": _sign,
    "Elu": _elu,
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": _hard_swish,
    "Clip": _clip,
    "Pad": _pad,
    "InstanceNormalization": _instance_norm,
    "Einsum": _einsum,
    "DepthToSpace": _depth_space,
    "SpaceToDepth": _depth_space,
    "Softplus": _softplus,
    "Softsign": _softsign,
    "Mish": _mish,
    "Selu": _selu,
    "Celu": _celu,
    "ThresholdedRelu": _thresholded_relu,
    "PRelu": _prelu,
    "Shrink": _shrink,
}

__all__ = ["prepass", "upgrade_opset", "UnsupportedModelError"]

# issue #9 §1: rewrites kept in their own modules (engine/compile/ops_*.py)
from . import ops_einsum, ops_reduce, ops_resize  # noqa: E402

_REWRITES.update({**ops_reduce.REWRITES, **ops_resize.REWRITES, **ops_einsum.REWRITES})
