"""The compiler as one ordered list of passes (design/lowering.md; tf2onnx's rewriter list).

``COMPILE_PASSES`` turns a classifier into the portable input-gradient model: opset upgrade,
constant folding, the forward rewrites (``engine.compile.rewrites``), input isolation, the
quantized pairs' straight-through bypass, the loss head (and Grad-CAM tap), the builder, the
pairs' restoration, the lowerings (``engine.compile.lowering``), output selection, dead-code
elimination, topological sort, opset-import pruning and the opset-13 declaration. The checks
that follow (onnx.checker, the self-check) are not passes: they change nothing.

``TUNING_PASSES`` are the onnxruntime-specific rewrites (``engine.compile.tuning``) applied
where an onnxruntime session loads the portable graph.

Each pass is ``run(state) -> count`` (how often it fired: nodes rewritten, tensors folded, 1 for
a whole-graph step that changed the graph, 0 when it did nothing) or ``{name: count}`` for a family
(``rewrite/<op>``, ``lower/<op>``). :func:`run_passes` returns the counts in order; compile stores
those that fired in ``CompiledInfo.passes``, tune all of its own in ``CompiledInfo.tuned``. A new
pass is one function and one entry in a list.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from ..errors import InputError, LoweringError, UnsupportedModelError
from ..modelfile import ModelFile
from . import builder, head, static_shapes, ste
from .domains import MAX_IR_VERSION
from .graph import eliminate_dead_code, infer_shapes, opset_version, prune_opset_imports, topological_sort
from .lowering import lower
from .rewrites import (
    apply_rewrites,
    fold_constant_nodes,
    fold_constant_subgraphs,
    isolate_input,
    upgrade_opset,
)
from .rules import gradient_definitions
from .scratch import scratch_dir
from .tuning.broadcasts import upsample_broadcasts
from .tuning.masks import conv_masks
from .tuning.opset13 import lower_opset_to_13


@dataclass
class Compilation:
    """What the compile passes read and write: ``model`` is the forward graph, then the built and
    lowered gradient graph."""

    source: ModelFile
    model: onnx.ModelProto
    where: str = "model"
    rule: str = "gradient"
    layer: str | None = None
    tap: str | None = None  # the tapped tensor, once the head pass resolved ``layer``
    headed: onnx.ModelProto | None = None  # the builder's input (the self-check rebuilds it)
    qdq_pairs: list = field(default_factory=list)
    qdq_tensors: list = field(default_factory=list)
    lowered_ops: list[str] = field(default_factory=list)


@dataclass
class Tuning:
    """What the tuning passes read and write: the gradient model and its shapes, inferred once."""

    model: onnx.ModelProto
    shapes: dict = field(default_factory=dict)

    def __post_init__(self):
        self.shapes = self.shapes or infer_shapes(self.model)


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable


def run_passes(passes: list[Pass], state, keep_zero: bool = False) -> dict[str, int]:
    """Run ``passes`` in order on ``state``; {pass name (or name/member): count} in that order,
    only those that fired unless ``keep_zero``."""
    fired: dict[str, int] = {}
    for p in passes:
        result = p.run(state)
        items = result.items() if isinstance(result, dict) else [(None, result)]
        for member, count in items:
            name = p.name if member is None else f"{p.name}/{member}"
            if count or keep_zero:
                fired[name] = fired.get(name, 0) + int(count)
    return fired


# ------------------------------------------------------------------------------ before the build


def _upgrade_opset(c: Compilation) -> int:
    before = c.model
    c.model = upgrade_opset(c.model, c.where)
    return int(c.model is not before)


def _fold_computed_pads(c: Compilation) -> int:
    before = c.model
    c.model = fold_constant_subgraphs(c.model)
    return int(c.model is not before)


def _fold_constant_nodes(c: Compilation) -> int:
    c.model, count = fold_constant_nodes(c.model)
    return count


def _rewrite(c: Compilation) -> dict[str, int]:
    c.model, fired = apply_rewrites(c.model, c.where)
    return fired


def _isolate_input(c: Compilation) -> int:
    isolate_input(c.model, c.source.input_name)
    return 1


def _ste_bypass(c: Compilation) -> int:
    c.model, c.qdq_pairs, c.qdq_tensors = ste.bypass(c.model)
    return len(c.qdq_pairs)


def _head(c: Compilation) -> int:
    """The loss head, and the Grad-CAM tap when a layer is asked for; the builder's input."""
    fwd, mf = c.model, c.source
    shapes = infer_shapes(fwd)
    if c.layer is not None:
        c.tap = head.last_feature_map(fwd, shapes) if c.layer == "auto" else c.layer
        if c.tap not in shapes:
            known = [n.output[0] for n in fwd.graph.node if n.op_type == "Conv"][-5:]
            raise InputError(
                f"{c.where}: layer {c.tap!r} is not a tensor of the model (last Conv outputs: {known})"
            )
    m = onnx.ModelProto()
    m.CopyFrom(fwd)
    head.add_head(m, mf.output_name, mf.num_classes, mf.batch_dim)
    if c.tap:
        dims = list(shapes[c.tap])
        dims[0] = mf.batch_dim
        head.add_tap(m, c.tap, dims)
    m.ir_version = min(m.ir_version, MAX_IR_VERSION)
    c.headed = c.model = m
    return 1


# ------------------------------------------------------------------------------ the build


def _build(c: Compilation) -> int:
    wrt = [c.source.input_name] + ([head.TAP_DELTA] if c.tap else [])
    with scratch_dir("build-") as tmp:
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
                    "gradients": gradient_definitions(c.rule),
                }
            )
        except builder.BuilderError as e:
            raise explain_build_failure(e, c.where) from e
        c.model = onnx.load(dst)
    return 1


def explain_build_failure(e: Exception, where: str) -> Exception:
    """Name the node and op the builder could not differentiate."""
    msg = str(e)
    found = re.search(r"not been registered: (\S+) for node (.+)", msg)
    if found:
        op, node = found.group(1), found.group(2).strip()
        return UnsupportedModelError(
            f"{where}: node {node!r} (op {op}) cannot be differentiated: onnxruntime-training has no "
            f"gradient for {op}. Rewrite that part of the model with differentiable standard ops "
            "(or open an issue asking for a prepass rewrite of it)"
        )
    return builder.BuilderError(f"{where}: gradient build failed: {msg}")


# ------------------------------------------------------------------------------ after the build


def _ste_restore(c: Compilation) -> int:
    return ste.restore(c.model, c.qdq_pairs, c.qdq_tensors)


def _shapes_for_lowering(headed, built) -> dict:
    shapes = infer_shapes(headed)
    for vi in built.graph.value_info:
        t = vi.type.tensor_type
        if t.HasField("shape") and vi.name not in shapes:
            shapes[vi.name] = [
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim
            ]
    for name, dims in list(shapes.items()):  # a gradient has the shape of its tensor
        shapes.setdefault(head.gradient_name(name), dims)
    return shapes


def _lower(c: Compilation) -> dict[str, int]:
    try:
        shapes = _shapes_for_lowering(c.headed, c.model)
        static_shapes.complete(c.headed, c.model, shapes, c.source.input_name, head.gradient_name)
        c.lowered_ops = lower(c.model, shapes)
        static_shapes.portable(c.model)
    except LoweringError as e:
        raise LoweringError(f"{c.where}: {e}") from e
    counts: dict[str, int] = {}
    for op in c.lowered_ops:
        counts[op] = counts.get(op, 0) + 1
    return counts


def output_names(c: Compilation) -> list[str]:
    """The gradient model's outputs, in order: logits, scores, input gradient (+ tap, its gradient)."""
    names = [c.source.output_name, head.SCORES, head.gradient_name(c.source.input_name)]
    if c.tap:
        names += [head.TAP, head.gradient_name(head.TAP_DELTA)]
    return names


def _select_outputs(c: Compilation) -> int:
    g = c.model.graph
    by_name = {o.name: o for o in g.output}
    outs = [by_name.get(name) or onnx.helper.make_empty_tensor_value_info(name) for name in output_names(c)]
    del g.output[:]
    g.output.extend(outs)
    return 1


def _eliminate_dead_code(state) -> int:
    before = len(state.model.graph.node)
    eliminate_dead_code(state.model)
    return before - len(state.model.graph.node)


def _node_order(model: onnx.ModelProto) -> list[tuple]:
    # by content, not id(): protobuf hands out new wrapper objects, so ids are no identity and the
    # recorded count (part of the compiled bytes) would vary from run to run
    return [(n.name, n.op_type, tuple(n.input), tuple(n.output)) for n in model.graph.node]


def _topological_sort(state) -> int:
    before = _node_order(state.model)
    topological_sort(state.model)
    return int(_node_order(state.model) != before)


def _prune_opset_imports(c: Compilation) -> int:
    before = len(c.model.opset_import)
    prune_opset_imports(c.model)
    return before - len(c.model.opset_import)


def _opset_13(c: Compilation) -> int:
    return int(lower_opset_to_13(c.model, opset_version(c.model)))


COMPILE_PASSES: list[Pass] = [
    Pass("upgrade_opset", _upgrade_opset),
    Pass("fold_computed_pads", _fold_computed_pads),
    Pass("fold_constant_nodes", _fold_constant_nodes),
    Pass("rewrite", _rewrite),
    Pass("isolate_input", _isolate_input),
    Pass("ste_bypass", _ste_bypass),
    Pass("head", _head),
    Pass("build", _build),
    Pass("ste_restore", _ste_restore),
    Pass("lower", _lower),
    Pass("select_outputs", _select_outputs),
    Pass("eliminate_dead_code", _eliminate_dead_code),
    Pass("topological_sort", _topological_sort),
    Pass("prune_opset_imports", _prune_opset_imports),
    Pass("opset_13", _opset_13),
]

# ------------------------------------------------------------------------------ tuning


def _conv_masks(t: Tuning) -> int:
    return conv_masks(t.model, t.shapes)


def _upsample_broadcasts(t: Tuning) -> int:
    return upsample_broadcasts(t.model, t.shapes, opset_version(t.model))


TUNING_PASSES: list[Pass] = [
    Pass("conv_masks", _conv_masks),
    Pass("upsample_broadcasts", _upsample_broadcasts),
    Pass("eliminate_dead_code", _eliminate_dead_code),  # the comparisons the masks replaced
    Pass("topological_sort", _topological_sort),
]


def passes_until(name: str, skip: tuple[str, ...] = ()) -> list[Pass]:
    """COMPILE_PASSES up to and including ``name``, without those named in ``skip``."""
    names = [p.name for p in COMPILE_PASSES]
    return [p for p in COMPILE_PASSES[: names.index(name) + 1] if p.name not in skip]
