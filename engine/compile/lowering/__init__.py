"""Lower onnxruntime-training gradient ops to standard ONNX (design/lowering.md, the table).

One function per training-only op, grouped by family: activations, arithmetic (Scale,
FusedMatMul, DivGrad), conv, pool, tensor (Gather/Slice/broadcast axes) and norm. Each is
registered with ``@lowering(op_type, domain)`` (``registry.py``) and unit-tested on a one-node
graph against numeric differentiation (tests/test_compiler_units.py); the self-check compares
every compiled graph with the builder's own kernels.

Not lowered, because the builder never emits them for a model that reaches it: ReluGrad (the
builder worker registers its own Relu gradient for every backward rule) and the Gelu family
(GeluGrad, FastGeluGrad, BiasGelu*, QuickGeluGrad: the rewrites decompose Gelu first, and the
com.microsoft forward ops are refused before the build).
"""

from __future__ import annotations

import onnx

from ...errors import LoweringError
from ..graph import GraphContext, is_standard
from . import (  # noqa: F401  (they register)
    activations,
    arithmetic,
    conv,
    gather,  # noqa: F401, E402  (GatherElements/GatherND/Trilu gradients)
    norm,
    pool,
    tensor,
)
from .conv import flipped_kernel
from .registry import LOWERINGS, lowering

__all__ = ["LOWERINGS", "LoweringError", "flipped_kernel", "lower", "lowering"]


def lower(model: onnx.ModelProto, shapes: dict) -> list[str]:
    """Rewrite every training-only op of ``model`` in place. Returns the op types lowered, one
    entry per node."""
    ctx = GraphContext(model, shapes)
    out_nodes, lowered = [], []
    for node in model.graph.node:
        key = (node.domain or "", node.op_type)
        fn = LOWERINGS.get(key)
        if fn is None:
            if not is_standard(node):
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
