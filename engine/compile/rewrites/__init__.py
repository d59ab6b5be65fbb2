"""Forward-graph rewrites run before the build, by family: activations, normalization,
reductions, padding, einsum, layout (one function per op, ``@rewrite(op_type)`` in
``registry.py``), plus folding and opset upgrades. The compiler's pass list
(``engine.compile.passes``) runs them in order; every rewrite keeps the forward values
bit-for-bit or to float rounding (tests/test_compiler_units.py compares each with the original op,
values and gradients).
"""

from __future__ import annotations

import onnx
from onnx import helper

from ...errors import UnsupportedModelError
from ..graph import GraphContext, infer_shapes, is_standard
from . import activations, einsum, layout, normalization, padding, reductions  # noqa: F401  (they register)
from .folding import fold_constant_nodes, fold_constant_subgraphs
from .normalization import batchnorm_factors
from .opset import upgrade_opset
from .registry import REWRITES, rewrite

__all__ = [
    "REFUSED",
    "REWRITES",
    "apply_rewrites",
    "batchnorm_factors",
    "fold_constant_nodes",
    "fold_constant_subgraphs",
    "isolate_input",
    "rewrite",
    "upgrade_opset",
]

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


def apply_rewrites(model: onnx.ModelProto, where: str = "model") -> tuple[onnx.ModelProto, dict[str, int]]:
    """A copy of ``model`` with every registered rewrite applied, in one sweep over the nodes (one
    GraphContext, so fresh names and new initializers come in node order), and how many nodes
    each rewrite replaced. Refuses ops in REFUSED and non-standard domains first."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for node in m.graph.node:
        if node.op_type in REFUSED and is_standard(node):
            raise UnsupportedModelError(
                f"{where}: node {node.name!r} (op {node.op_type}) cannot be differentiated: "
                f"{REFUSED[node.op_type]}"
            )
        if not is_standard(node):
            raise UnsupportedModelError(
                f"{where}: node {node.name!r} uses op {node.domain}::{node.op_type} outside the "
                "standard ONNX domain; export with standard ops only"
            )
    ctx = GraphContext(m, infer_shapes(m))
    new_nodes, fired = [], {}
    for node in m.graph.node:
        fn = REWRITES.get(node.op_type)
        new = fn(node, ctx, where) if fn else [node]
        if not (len(new) == 1 and new[0] is node):
            fired[node.op_type] = fired.get(node.op_type, 0) + 1
        new_nodes.extend(new)
    del m.graph.node[:]
    m.graph.node.extend(new_nodes)
    m.graph.initializer.extend(ctx.new_initializers)
    return m, fired


def isolate_input(m: onnx.ModelProto, input_name: str) -> None:
    """Feed the input through an Identity: a node like Mul(x, x) directly on a graph input makes
    the builder emit a duplicate x_grad."""
    alias = "onnxplain/input_identity"
    for node in m.graph.node:
        for i, name in enumerate(node.input):
            if name == input_name:
                node.input[i] = alias
    m.graph.node.insert(0, helper.make_node("Identity", [input_name], [alias], name=alias))


# ops the builder lacks (issue #9 §1), each family with its own REWRITES table; einsum_matmul
# replaces einsum's entry (the broadcast product stays its fallback)
from . import aggregates, einsum_matmul, resize  # noqa: E402

REWRITES.update({**aggregates.REWRITES, **resize.REWRITES, **einsum_matmul.REWRITES})
