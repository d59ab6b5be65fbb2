"""The excitation graph: excitation backprop (Zhang et al., ECCV 2016 / IJCV 2018) as a gradient.

The marginal winning probability (MWP) of a neuron is propagated top-down, layer by layer:
for a linear layer y = W a + b with non-negative input a, W+ = max(W, 0) and z+ = W+ a (no bias),

    P(a_j) = a_j · Σ_i W+_ij P(y_i) / z+_i          (0 where z+_i = 0).

Given the forward activations this recursion is linear in P, so it is the gradient of a graph:
the original forward runs from a constant copy x_c of the input (a graph input the builder does
not differentiate: a stop-gradient), giving every activation a and every z+; a second path from
x replaces each linear layer by h_out = Op(h_in, W+) · (a_out / z+) and every other op by a map
that is linear in h with coefficients read from the constant path. Its gradient g satisfies
g_in = W+ᵀ (g_out · a_out / z+), so with P = a · g it is exactly the MWP recursion. After
GradientGraphBuilder and the lowering, x_c is renamed to x: one input, one pass.

Rules (docs/excitation-backprop.md):
- Conv, Gemm, MatMul with a constant weight: the linear rule above. Per-channel Mul/Div and
  Add/Sub of constants right after it (a BatchNormalization after the prepass, a bias) are
  folded into it first, so W+ is taken of the folded weights. A negative input counts as zero
  (its neuron does not fire: max(a, 0) enters z+ and P).
- Relu, Clip: P passes unchanged (h_out = h_in · a_out / a_in).
- MaxPool: winner takes all (h gathered at the constant path's argmax indices).
- AveragePool, GlobalAveragePool, ReduceMean, ReduceSum: linear layers with positive weights.
- Add of two activations: a positive linear layer with weights 1 (split by contribution).
- Add/Sub of a constant: a bias, P passes; Mul/Div by a constant: a diagonal linear layer.
- Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Concat, Slice, Split, Gather, Pad, Identity,
  Dropout: P moves with its neuron.
- Anything else on the activation path is refused, naming the node and op.

At the top the logits must come from a linear layer: P(target logit) = 1, and the "dual" unit of
contrastive MWP has the classifier weights −W. The score is Σ_k w_k (pos_k − c · dual_k) with class
weights w and a run-time contrast c (0: MWP, 1: c-MWP), so one graph serves both.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..errors import InputError, UnsupportedModelError
from . import head
from .graph import GraphContext, attrs, infer_shapes, topological_sort

RULE = "excitation"
CONSTANT_INPUT = "onnxplain_excitation_constant"  # the stop-gradient copy of the input
CONTRAST = "onnxplain_contrast"  # shape [1]: 0 for MWP, 1 for contrastive MWP
INPUT_LAYER = "input"

# P moves with its neuron: the op is applied to h as it is (extra inputs read from the constant path).
_STRUCTURAL = {
    "Identity",
    "Flatten",
    "Reshape",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Concat",
    "Slice",
    "Split",
    "Gather",
    "Pad",
    "Dropout",
    "Cast",
}
_POOLS = {"AveragePool", "GlobalAveragePool", "ReduceMean", "ReduceSum"}
_LINEAR = {"Conv", "Gemm", "MatMul"}
_INTEGER_OUTPUT = {"Shape", "Size"}  # read activations but carry no probability
_WHY = {
    "Softmax": "a softmax inside the network (attention) has no excitation rule",
    "Sigmoid": "a sigmoid (gating, Swish, squeeze-excitation) has no excitation rule",
    "Tanh": "tanh has no excitation rule",
    "HardSigmoid": "hard-sigmoid (hard-swish, squeeze-excitation) has no excitation rule",
    "HardSwish": "hard-swish multiplies two activations: no excitation rule",
    "LayerNormalization": "normalising by the input's own statistics has no excitation rule",
    "InstanceNormalization": "normalising by the input's own statistics has no excitation rule",
    "GlobalMaxPool": "use MaxPool with the full spatial kernel (GlobalMaxPool is not supported yet)",
}


def _refuse(where, node, why) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{where}: node {node.name!r} (op {node.op_type}) has no excitation-backprop rule: {why}"
    )


def check_supported(model: onnx.ModelProto, input_name: str, where: str) -> None:
    """Refuse, naming the node of the model as given, the ops on the activation path the rule has
    no definition for (before the prepass rewrites some of them into Mul/Add chains)."""
    active = {input_name}
    for node in model.graph.node:
        if not any(i in active for i in node.input):
            continue
        if node.op_type in _WHY:
            raise _refuse(where, node, _WHY[node.op_type])
        if node.op_type in _INTEGER_OUTPUT:
            continue
        active.update(o for o in node.output if o)


class _Builder:
    """Walks the prepassed forward graph once and writes the h path beside it."""

    def __init__(self, model: onnx.ModelProto, input_name: str, logits: str, tap: str | None, where):
        self.m, self.x, self.logits, self.tap, self.where = model, input_name, logits, tap, where
        self.ctx = GraphContext(model, infer_shapes(model))
        self.consumers: dict[str, list] = {}
        for n in model.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.h: dict[str, str] = {}
        self.nonneg: set[str] = set()  # activations known >= 0 (no mask needed before a layer)
        self.nodes: list = []
        self.skip: set[int] = set()
        self.top = None

    # ---------------------------------------------------------------- small graph helpers
    def emit(self, op, inputs, hint, **kw) -> str:
        out = self.ctx.fresh(hint)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **kw))
        return out

    def mask(self, a: str) -> str:
        zero = self.ctx.const(np.float32(0), "zero")
        return self.emit("Cast", [self.emit("Greater", [a, zero], "positive")], "mask", to=TensorProto.FLOAT)

    def safe_div(self, num: str | None, den: str) -> str:
        """num / den, 0 where den == 0 (num None: 1 / den)."""
        zero = self.ctx.const(np.float32(0), "zero")
        quotient = self.emit("Div", [num, den], "ratio") if num else self.emit("Reciprocal", [den], "inv")
        return self.emit("Where", [self.emit("Equal", [den, zero], "den_zero"), zero, quotient], "safe")

    def set_h(self, tensor: str, name: str) -> None:
        if tensor == self.tap:  # consumers read h + delta: d loss / d delta = d loss / d h
            name = self.emit("Add", [name, head.TAP_DELTA], "tapped")
        self.h[tensor] = name

    def positive_input(self, a: str) -> tuple[str, str]:
        """(h masked where a <= 0, max(a, 0)): what a layer reads of a possibly negative input."""
        if a in self.nonneg:
            return self.h[a], a
        m = self.mask(a)
        return self.emit("Mul", [self.h[a], m], "h_pos"), self.emit("Mul", [a, m], "a_pos")

    # ---------------------------------------------------------------- the walk
    def run(self) -> None:
        self.h[self.x] = self.x
        for node in list(self.m.graph.node):
            if id(node) in self.skip or not any(i in self.h for i in node.input):
                continue
            if node.op_type in _INTEGER_OUTPUT:
                continue
            if node.domain not in ("", "ai.onnx"):
                raise _refuse(self.where, node, "not a standard ONNX op")
            op = node.op_type
            if op in _LINEAR:
                self.linear(node)
            elif op == "Relu":
                out = node.output[0]
                self.set_h(out, self.emit("Mul", [self.h[node.input[0]], self.mask(node.input[0])], "h_relu"))
                self.nonneg.add(out)
            elif op == "Clip":
                self.clip(node)
            elif op == "MaxPool":
                self.max_pool(node)
            elif op in _POOLS:
                self.pool(node)
            elif op in ("Add", "Sub", "Mul", "Div"):
                self.elementwise(node)
            elif op in _STRUCTURAL:
                self.structural(node)
            else:
                raise _refuse(self.where, node, _WHY.get(op, "the rule has no definition for it"))
        if self.top is None:
            raise UnsupportedModelError(
                f"{self.where}: the logits {self.logits!r} do not come from a linear layer (Gemm, "
                "MatMul or Conv): excitation backprop starts at the classifier's weights"
            )
        if self.tap is not None and self.tap not in self.h:
            raise InputError(
                f"{self.where}: layer {self.tap!r} is not an activation excitation backprop reaches "
                "(name a tensor between the input and the classifier layer, or use 'input')"
            )

    def const_operand(self, node):
        """(activation input, constant value, activation first) of a binary op, or None."""
        a, b = node.input[0], node.input[1]
        if a in self.h and b not in self.h:
            value = self.ctx.const_value(b)
            return (a, value, True) if value is not None else None
        if b in self.h and a not in self.h:
            value = self.ctx.const_value(a)
            return (b, value, False) if value is not None else None
        return None

    def structural(self, node) -> None:
        op = node.op_type
        if op == "Gather" and node.input[1] in self.h:
            raise _refuse(self.where, node, "indices computed from the input")
        if op == "Cast" and attrs(node).get("to") != TensorProto.FLOAT:
            raise _refuse(self.where, node, "a cast to a type other than float32")
        inputs = [self.h.get(i, i) for i in node.input]
        if op == "Dropout":  # eval mode: the identity
            node = helper.make_node("Identity", node.input[:1], node.output[:1], name=node.name)
            inputs = inputs[:1]
        outs = [self.ctx.fresh("h_" + op.lower()) if o else "" for o in node.output]
        if op not in ("Split",):
            outs = outs[:1]
        copy = helper.make_node(op, inputs, outs, name=outs[0])
        copy.attribute.extend(node.attribute)
        self.nodes.append(copy)
        sources_nonneg = all(i in self.nonneg for i in node.input if i in self.h)
        for o, h in zip(node.output, outs):
            if h:
                self.set_h(o, h)
                if sources_nonneg:
                    self.nonneg.add(o)

    def clip(self, node) -> None:
        x, out = node.input[0], node.output[0]
        lo = self.ctx.const_value(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        if any(i in self.h for i in node.input[1:] if i):
            raise _refuse(self.where, node, "bounds computed from the input")
        self.set_h(out, self.emit("Mul", [self.h[x], self.safe_div(out, x)], "h_clip"))
        if lo is not None and float(np.min(lo)) >= 0:
            self.nonneg.add(out)

    def max_pool(self, node) -> None:
        if attrs(node).get("storage_order", 0):
            raise _refuse(self.where, node, "storage_order=1")
        if len(node.output) < 2 or not node.output[1]:
            # the constant path's MaxPool also says where its winners are (flat indices over
            # the whole tensor, batch and channel included)
            while len(node.output) < 2:
                node.output.append("")
            node.output[1] = self.ctx.fresh("argmax")
        flat = self.emit(
            "Reshape", [self.h[node.input[0]], self.ctx.const(np.array([-1], np.int64))], "h_flat"
        )
        self.set_h(node.output[0], self.emit("Gather", [flat, node.output[1]], "h_maxpool", axis=0))
        if node.input[0] in self.nonneg:
            self.nonneg.add(node.output[0])

    def _copy(self, node, inputs, hint) -> str:
        out = self.ctx.fresh(hint)
        copy = helper.make_node(node.op_type, inputs, [out], name=out)
        copy.attribute.extend(node.attribute)
        self.nodes.append(copy)
        return out

    def pool(self, node) -> None:
        x, out = node.input[0], node.output[0]
        rest = list(node.input[1:])  # ReduceSum / ReduceMean axes
        if any(i in self.h for i in rest if i):
            raise _refuse(self.where, node, "axes computed from the input")
        if x in self.nonneg:  # z+ = a_out: the ratio is 1 wherever P can flow
            self.set_h(out, self._copy(node, [self.h[x], *rest], "h_pool"))
            self.nonneg.add(out)
            return
        h_pos, a_pos = self.positive_input(x)
        z = self._copy(node, [a_pos, *rest], "z_pool")
        pooled = self._copy(node, [h_pos, *rest], "h_pool")
        self.set_h(out, self.emit("Mul", [pooled, self.safe_div(out, z)], "h_pool_scaled"))

    def elementwise(self, node) -> None:
        op, out = node.op_type, node.output[0]
        const = self.const_operand(node)
        if const is None:
            if op != "Add":
                why = (
                    "a product of two activations (attention, gating, Swish)"
                    if op in ("Mul", "Div")
                    else "a difference of two activations has no positive-weight reading"
                )
                raise _refuse(self.where, node, why)
            u, v = node.input[0], node.input[1]
            if u not in self.h or v not in self.h:
                raise _refuse(self.where, node, "an operand computed from the input at run time")
            (hu, au), (hv, av) = self.positive_input(u), self.positive_input(v)
            h_sum = self.emit("Add", [hu, hv], "h_sum")
            if u in self.nonneg and v in self.nonneg:
                self.set_h(out, h_sum)
                self.nonneg.add(out)
            else:
                z = self.emit("Add", [au, av], "z_sum")
                self.set_h(out, self.emit("Mul", [h_sum, self.safe_div(out, z)], "h_add"))
            return
        x, value, first = const
        if op in ("Add", "Sub"):
            if op == "Sub" and not first:
                raise _refuse(self.where, node, "a constant minus an activation (weight -1: no P)")
            self.set_h(out, self.emit("Mul", [self.h[x], self.safe_div(out, x)], "h_bias"))
            return
        if op == "Div" and not first:
            raise _refuse(self.where, node, "a constant divided by an activation")
        scale = np.asarray(value, np.float64)
        scale = 1.0 / scale if op == "Div" else scale
        s_name = node.input[1] if first else node.input[0]
        if op == "Div":
            s_name = self.emit("Reciprocal", [s_name], "inverse")
        positive = self.emit("Relu", [s_name], "scale_pos")  # in the graph: see linear()
        if x in self.nonneg:
            coefficient = positive
        else:
            coefficient = self.emit("Mul", [self.mask(x), positive], "scale_masked")
        self.set_h(out, self.emit("Mul", [self.h[x], coefficient], "h_scale"))
        if x in self.nonneg and np.all(scale >= 0):
            self.nonneg.add(out)

    # ---------------------------------------------------------------- linear layers
    def _per_channel(self, value, out: str, channel_axis: int) -> np.ndarray | None:
        """A constant that is one number per output channel (or a scalar), as a (C,) vector."""
        dims = self.ctx.shapes.get(out)
        v = np.asarray(value, np.float64)
        if dims is None or not isinstance(dims[channel_axis], int):
            return None
        c = dims[channel_axis]
        rank = len(dims)
        if v.ndim > rank:
            return None
        full = v.reshape((1,) * (rank - v.ndim) + v.shape)
        axis = channel_axis % rank
        if any(d != 1 for i, d in enumerate(full.shape) if i != axis) or full.shape[axis] not in (1, c):
            return None
        return np.broadcast_to(full.reshape(-1), (c,)).copy()

    def linear(self, node) -> None:
        op = node.op_type
        a = attrs(node)
        x = node.input[0]
        w_name = node.input[1]
        if x not in self.h or w_name in self.h or any(i in self.h for i in node.input[2:] if i):
            raise _refuse(self.where, node, "the weight must be a constant and the input an activation")
        w = self.ctx.const_value(w_name)
        if w is None:
            raise _refuse(self.where, node, "its weight is not a constant")
        # W+ is computed in the graph from the weights' own initializers (onnxruntime folds it
        # when a session is built), so Classifier.with_initializers (the sanity checks) changes
        # it with the weights instead of leaving a stale copy
        w_expr = w_name
        if op == "Gemm":
            if a.get("transA", 0):
                raise _refuse(self.where, node, "transA=1")
            if float(a.get("alpha", 1.0)) != 1.0:
                alpha = self.ctx.const(np.float32(a.get("alpha", 1.0)), "alpha")
                w_expr = self.emit("Mul", [w_expr, alpha], "w_alpha")
            out_axis = 0 if a.get("transB", 0) else 1  # the axis of w holding output units
        elif op == "MatMul":
            if np.ndim(w) != 2:
                raise _refuse(self.where, node, f"a weight of rank {np.ndim(w)} (2 needed)")
            out_axis = 1
        else:
            out_axis = 0
        channel_axis = 1 if op == "Conv" else -1
        # fold the per-channel scales (BatchNormalization after the prepass) and biases that follow
        end = node.output[0]
        while end != self.tap and end != self.logits:
            users = self.consumers.get(end, [])
            if len(users) != 1 or users[0].op_type not in ("Mul", "Div", "Add", "Sub"):
                break
            nxt = users[0]
            const = self.const_operand_of(nxt, end)
            if const is None:
                break
            value, first, name = const
            vec = self._per_channel(value, nxt.output[0], channel_axis)
            if vec is None or (nxt.op_type in ("Sub", "Div") and not first):
                break
            if nxt.op_type in ("Mul", "Div"):
                if nxt.op_type == "Div":
                    name = self.emit("Reciprocal", [name], "w_inverse")
                shape = [1] * np.ndim(w)
                shape[out_axis] = -1
                scale = self.emit("Reshape", [name, self.ctx.const(np.array(shape, np.int64))], "w_scale")
                w_expr = self.emit("Mul", [w_expr, scale], "w_folded")
            self.skip.add(id(nxt))
            end = nxt.output[0]
        h_in, a_in = self.positive_input(x)
        if end == self.logits or self._structural_tail(end) is not None:
            self.top = (node, w_expr, h_in, a_in, end)
            return
        w_pos = self.emit("Relu", [w_expr], "w_pos")
        z = self._linear_op(node, a_in, w_pos, "z")
        hz = self._linear_op(node, h_in, w_pos, "h_lin")
        self.set_h(end, self.emit("Mul", [hz, self.safe_div(end, z)], "h_linear"))

    def const_operand_of(self, node, tensor):
        """(constant value, whether ``tensor`` is the first operand, the constant's name) when
        ``node`` combines ``tensor`` with a constant, else None."""
        a, b = node.input[0], node.input[1]
        other, first = (b, True) if a == tensor else (a, False)
        if other == tensor:
            return None
        value = self.ctx.const_value(other)
        return None if value is None else (value, first, other)

    def _linear_op(self, node, x: str, w: str, hint: str) -> str:
        out = self.ctx.fresh(hint)
        if node.op_type == "Gemm":
            keep = [at for at in node.attribute if at.name == "transB"]
            n = helper.make_node("Gemm", [x, w], [out], name=out)
            n.attribute.extend(keep)
        else:
            n = helper.make_node(node.op_type, [x, w], [out], name=out)
            n.attribute.extend(node.attribute)
        self.nodes.append(n)
        return out

    def _structural_tail(self, tensor: str) -> list | None:
        """The Reshape/Flatten/Squeeze/Identity nodes from ``tensor`` to the logits, else None."""
        tail = []
        while tensor != self.logits:
            users = self.consumers.get(tensor, [])
            if len(users) != 1 or users[0].op_type not in ("Reshape", "Flatten", "Squeeze", "Identity"):
                return None
            if any(i in self.h for i in users[0].input[1:] if i):
                return None
            tail.append(users[0])
            tensor = users[0].output[0]
        return tail

    # ---------------------------------------------------------------- the head
    def add_head(self, num_classes: int, batch_dim) -> None:
        node, w, h_in, a_in, end = self.top
        tail = self._structural_tail(end) or []
        for t in tail:
            self.skip.add(id(t))
        terms = []
        for negate, hint in ((False, "target"), (True, "dual")):
            weight = self.emit("Relu", [self.emit("Neg", [w], "w_negated") if negate else w], f"w_{hint}")
            z = self._linear_op(node, a_in, weight, f"z_{hint}")
            hz = self._linear_op(node, h_in, weight, f"h_{hint}")
            p = self.emit("Mul", [hz, self.safe_div(None, z)], f"p_{hint}")
            for t in tail:
                p = self._copy(t, [p, *t.input[1:]], f"p_{hint}_{t.op_type.lower()}")
            terms.append(p)
        g = self.m.graph
        g.input.append(
            helper.make_tensor_value_info(head.CLASS_WEIGHTS, TensorProto.FLOAT, [batch_dim, num_classes])
        )
        g.input.append(helper.make_tensor_value_info(CONTRAST, TensorProto.FLOAT, [1]))
        dual = self.emit("Mul", [terms[1], CONTRAST], "dual_scaled")
        diff = self.emit("Sub", [terms[0], dual], "contrast")
        weighted = self.emit("Mul", [diff, head.CLASS_WEIGHTS], "weighted")
        axis = self.ctx.const(np.array([1], np.int64), "axis")
        self.nodes.append(
            helper.make_node(
                "ReduceSum", [weighted, axis], [head.SCORES], keepdims=0, name="excitation/scores"
            )
        )
        self.nodes.append(
            helper.make_node("ReduceSum", [head.SCORES], [head.LOSS], keepdims=0, name="excitation/loss")
        )
        g.output.append(helper.make_tensor_value_info(head.SCORES, TensorProto.FLOAT, [batch_dim]))
        g.output.append(helper.make_tensor_value_info(head.LOSS, TensorProto.FLOAT, []))


def excitation_graph(
    fwd: onnx.ModelProto, input_name: str, logits: str, num_classes: int, batch_dim, tap, where
):
    """The forward graph (from CONSTANT_INPUT) with the h path from ``input_name`` and the head."""
    m = onnx.ModelProto()
    m.CopyFrom(fwd)
    topological_sort(m)
    b = _Builder(m, input_name, logits, tap, where)
    b.run()
    b.add_head(num_classes, batch_dim)
    g = m.graph
    # the original forward reads the constant copy of the input; the h path reads the input
    for node in g.node:
        for i, name in enumerate(node.input):
            if name == input_name:
                node.input[i] = CONSTANT_INPUT
    x_info = next(i for i in g.input if i.name == input_name)
    const_info = onnx.ValueInfoProto()
    const_info.CopyFrom(x_info)
    const_info.name = CONSTANT_INPUT
    g.input.append(const_info)
    if tap:
        dims = list(b.ctx.shapes[tap])
        dims[0] = batch_dim
        g.input.append(helper.make_tensor_value_info(head.TAP_DELTA, TensorProto.FLOAT, dims))
        b.nodes.append(helper.make_node("Identity", [tap], [head.TAP], name="excitation/tap"))
        g.output.append(helper.make_tensor_value_info(head.TAP, TensorProto.FLOAT, dims))
    g.node.extend(b.nodes)
    g.initializer.extend(b.ctx.new_initializers)
    return m


def rename_constant_input(built: onnx.ModelProto, input_name: str) -> None:
    """After the build: the constant copy is the input itself (one feed, the same values)."""
    g = built.graph
    for node in g.node:
        for i, name in enumerate(node.input):
            if name == CONSTANT_INPUT:
                node.input[i] = input_name
    keep = [i for i in g.input if i.name != CONSTANT_INPUT]
    del g.input[:]
    g.input.extend(keep)


def _check(c) -> int:
    """Refuse what the rule has no definition for, on the graph as given (before the rewrites
    turn some of it into Mul/Add chains)."""
    check_supported(c.model, c.source.input_name, c.where)
    return 0


def _excitation_head(c) -> int:
    """The excitation graph (two paths, the score head, the tap) replaces the loss head."""
    from .domains import MAX_IR_VERSION

    fwd, mf = c.model, c.source
    shapes = infer_shapes(fwd)
    if c.layer is not None:
        c.tap = head.last_feature_map(fwd, shapes) if c.layer == "auto" else c.layer
        if c.tap not in shapes:
            known = [n.output[0] for n in fwd.graph.node if n.op_type == "Conv"][-5:]
            raise InputError(
                f"{c.where}: layer {c.tap!r} is not a tensor of the model (last Conv outputs: {known})"
            )
    m = excitation_graph(fwd, mf.input_name, mf.output_name, mf.num_classes, mf.batch_dim, c.tap, c.where)
    m.ir_version = min(m.ir_version, MAX_IR_VERSION)
    c.headed = c.model = m
    return 1


def _excitation_build(c) -> int:
    """The builder on the excitation graph with the plain gradient rule; with a tap only its
    gradient is wanted (the backward stops there)."""
    from pathlib import Path

    from . import builder
    from .passes import explain_build_failure
    from .rules import gradient_definitions
    from .scratch import scratch_dir

    wrt = [head.TAP_DELTA] if c.tap else [c.source.input_name]
    with scratch_dir("excitation-") as tmp:
        src, dst = Path(tmp) / "head.onnx", Path(tmp) / "grad.onnx"
        onnx.save(c.headed, src)
        try:
            builder.call(
                {
                    "op": "build",
                    "model": str(src),
                    "output": str(dst),
                    "loss": head.LOSS,
                    "wrt": wrt,
                    "gradients": gradient_definitions("gradient"),
                }
            )
        except builder.BuilderError as e:
            raise explain_build_failure(e, f"{c.where} (excitation graph)") from e
        c.model = onnx.load(dst)
    return 1


def _rename_constant_input(c) -> int:
    rename_constant_input(c.model, c.source.input_name)
    return 1


def _select_outputs(c) -> int:
    g = c.model.graph
    wanted = [c.source.output_name, head.SCORES]
    wanted += (
        [head.TAP, head.gradient_name(head.TAP_DELTA)] if c.tap else [head.gradient_name(c.source.input_name)]
    )
    by_name = {o.name: o for o in g.output}
    outs = [by_name.get(n) or helper.make_empty_tensor_value_info(n) for n in wanted]
    del g.output[:]
    g.output.extend(outs)
    return 1


def excitation_passes() -> list:
    """The compile pass list with the excitation graph in place of the loss head."""
    from . import passes as p

    return [
        p.Pass("upgrade_opset", p._upgrade_opset),
        p.Pass("excitation_check", _check),
        p.Pass("fold_computed_pads", p._fold_computed_pads),
        p.Pass("fold_constant_nodes", p._fold_constant_nodes),
        p.Pass("rewrite", p._rewrite),
        p.Pass("isolate_input", p._isolate_input),
        p.Pass("excitation_head", _excitation_head),
        p.Pass("build", _excitation_build),
        p.Pass("rename_constant_input", _rename_constant_input),
        p.Pass("lower", p._lower),
        p.Pass("select_outputs", _select_outputs),
        p.Pass("eliminate_dead_code", p._eliminate_dead_code),
        p.Pass("topological_sort", p._topological_sort),
        p.Pass("prune_opset_imports", p._prune_opset_imports),
        p.Pass("opset_13", p._opset_13),
    ]


def compile_excitation(mf, layer: str | None, where: str):
    """The lowered excitation gradient model and its CompiledInfo (called by compile_model)."""
    from .. import __version__
    from . import COMPILER_VERSION, CompiledInfo, _finish, builder
    from .passes import Compilation, run_passes

    c = Compilation(source=mf, model=mf.model, where=where, rule=RULE, layer=layer)
    fired = run_passes(excitation_passes(), c)
    tap = c.tap
    info = CompiledInfo(
        rule=RULE,
        input=mf.input_name,
        logits=mf.output_name,
        scores=head.SCORES,
        input_gradient="" if tap else head.gradient_name(mf.input_name),
        num_classes=mf.num_classes,
        layer=tap,
        tap=head.TAP if tap else None,
        tap_gradient=head.gradient_name(head.TAP_DELTA) if tap else None,
        source_sha256=mf.sha256,
        lowered_ops=sorted(set(c.lowered_ops)),
        versions={
            "onnxplain": __version__,
            "compiler": COMPILER_VERSION,
            "builder": builder.BUILDER_REQUIREMENTS[0],
            "onnx": onnx.__version__,
        },
        # the builder's own graph is no independent check of the rule: tests compare with torch
        self_check={"status": "not run", "reason": "excitation graph (tests compare it with a torch MWP)"},
        passes=fired,
    )
    _finish(c.model, info, mf)
    return c.model, info


def run(classifier, x, target, layer: str | None, contrastive: bool):
    """(activation A at ``layer``, d score / d A) from the excitation graph: P = A · gradient.

    ``layer``: None (last convolutional feature map), "input" (A is x) or a tensor name.
    One runtime call per chunk of the classifier's batch size."""
    from ..model import _run_into

    x = classifier._check_x(x)
    targets = classifier._check_target(target, len(x))
    if len(x) == 0:
        raise InputError("excitation backprop needs at least one row")
    key = "auto" if layer is None else (None if layer == INPUT_LAYER else layer)
    sess, info = classifier._gradient_session(RULE, key)
    contrast = np.array([1.0 if contrastive else 0.0], np.float32)
    if info.tap:
        shape = classifier._tap_shape(sess, x[:1])
        act = np.empty((len(x), *shape), np.float32)
        grad = np.empty_like(act)
    else:
        act, grad = x, np.empty_like(x)
    scores = np.empty(len(x), np.float32)
    for s in classifier._chunks(len(x)):
        feeds = classifier._feeds(x[s], targets[s], classifier._check_output("logit"))
        del feeds[head.OUTPUT_MIX]
        feeds[CONTRAST] = contrast
        outputs = {info.scores: scores[s]}
        if info.tap:
            feeds[head.TAP_DELTA] = np.zeros((len(x[s]), *shape), np.float32)
            outputs.update({info.tap: act[s], info.tap_gradient: grad[s]})
        else:
            outputs[info.input_gradient] = grad[s]
        _run_into(sess, feeds, outputs, classifier._mf.where)
    return scores, act, grad


__all__ = [
    "RULE",
    "CONSTANT_INPUT",
    "CONTRAST",
    "INPUT_LAYER",
    "compile_excitation",
    "excitation_graph",
    "run",
]
