"""The attribution compiler: ONNX classifier -> standard-ONNX input-gradient model.

prepass -> head (+ tap) -> GradientGraphBuilder (builder interpreter) -> lower -> dead-code
elimination -> opset pruning -> onnx.checker -> self-check against the builder's own graph.
See design/ARCHITECTURE.md and design/lowering.md.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from .. import __version__
from ..errors import InputError
from ..modelfile import ModelFile, read_model
from . import builder, head, ste
from .graph import (
    eliminate_dead_code,
    infer_shapes,
    opset_version,
    prune_opset_imports,
    topological_sort,
)
from .lower import LoweringError, lower
from .optimize import lower_opset_to_13
from .prepass import UnsupportedModelError, prepass
from .scratch import scratch_dir

# Bump when the generated graphs change, so cached gradient models are rebuilt.
# 9: portable graph with onnxruntime rewrites at load; activation/InstanceNorm/Pad rewrites,
# constant folding, DivGrad (7: QDQ straight-through)
COMPILER_VERSION = "9"
GRADIENT_META = "onnxplain.gradient"
MAX_IR_VERSION = 10

__all__ = [
    "CompiledInfo",
    "compile_model",
    "compile_to_file",
    "LoweringError",
    "UnsupportedModelError",
    "BuilderError",
    "GRADIENT_META",
]
BuilderError = builder.BuilderError


@dataclass
class CompiledInfo:
    """Self-description stored in the gradient model's metadata (``onnxplain.gradient``)."""

    rule: str
    input: str
    logits: str
    scores: str
    input_gradient: str
    num_classes: int
    layer: str | None = None  # tapped tensor (Grad-CAM), None without a tap
    tap: str | None = None
    tap_gradient: str | None = None
    source_sha256: str = ""
    lowered_ops: list[str] = field(default_factory=list)
    self_check: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    # Rewrites tuned for one runtime, applied where that runtime loads the graph ({} in the
    # portable graph that compile writes; e.g. {"runtime": "onnxruntime", "conv_masks": 49}).
    tuned: dict = field(default_factory=dict)

    @classmethod
    def from_model(cls, model: onnx.ModelProto) -> CompiledInfo | None:
        for p in model.metadata_props:
            if p.key == GRADIENT_META:
                fields = {f.name for f in dataclasses.fields(cls)}
                # keys this version does not know (a newer compiler's) are ignored
                return cls(**{k: v for k, v in json.loads(p.value).items() if k in fields})
        return None


def compile_model(
    source,
    *,
    rule: str = "gradient",
    layer: str | None = None,
    self_check: bool = True,
) -> tuple[onnx.ModelProto, CompiledInfo]:
    """Build the lowered gradient model of a classifier (no cache; see engine.compile.cache).

    ``layer``: None (no tap), "auto" (last convolutional feature map) or a tensor name whose
    activation and gradient are exposed for Grad-CAM.
    """
    mf = source if isinstance(source, ModelFile) else read_model(source)
    where = str(mf.path) if mf.path else "model"
    if rule == "excitation":  # excitation backprop: a graph of its own (engine/compile/excitation.py)
        from .excitation import compile_excitation

        return compile_excitation(mf, layer, where)
    if rule not in ("gradient", "guided_backprop", "deconvnet"):
        raise InputError(f"unknown backward rule {rule!r}; use gradient, guided_backprop or deconvnet")
    fwd = prepass(mf.model, mf.input_name, where)
    fwd, qdq_pairs, qdq_tensors = ste.bypass(fwd)
    shapes = infer_shapes(fwd)
    tap = None
    if layer is not None:
        tap = head.last_feature_map(fwd, shapes) if layer == "auto" else layer
        if tap not in shapes:
            known = [n.output[0] for n in fwd.graph.node if n.op_type == "Conv"][-5:]
            raise InputError(
                f"{where}: layer {tap!r} is not a tensor of the model (last Conv outputs: {known})"
            )
    headed = _with_head(fwd, mf, shapes, tap)
    built = _build(headed, mf, tap, rule, where)
    ste.restore(built, qdq_pairs, qdq_tensors)
    full_shapes = _shapes_for_lowering(headed, built)
    try:
        lowered_ops = lower(built, full_shapes)
    except LoweringError as e:
        raise LoweringError(f"{where}: {e}") from e
    if qdq_pairs:
        lowered_ops.append("QuantizeLinear+DequantizeLinear (straight-through)")
    info = CompiledInfo(
        rule=rule,
        input=mf.input_name,
        logits=mf.output_name,
        scores=head.SCORES,
        input_gradient=head.gradient_name(mf.input_name),
        num_classes=mf.num_classes,
        layer=tap,
        tap=head.TAP if tap else None,
        tap_gradient=head.gradient_name(head.TAP_DELTA) if tap else None,
        source_sha256=mf.sha256,
        lowered_ops=sorted(set(lowered_ops)),
        versions={
            "onnxplain": __version__,
            "compiler": COMPILER_VERSION,
            "builder": builder.BUILDER_REQUIREMENTS[0],
            "onnx": onnx.__version__,
        },
    )
    _finish(built, info, mf)
    if self_check:
        from .selfcheck import self_check as run_check

        info.self_check = run_check(built, headed, mf, info, where)
    else:  # recorded, so a gradient model that was never checked says so
        info.self_check = {"status": "not run", "reason": "disabled (self_check=False)"}
    _set_meta(built, info)
    return built, info


def builder_graph(source, *, rule: str = "gradient") -> tuple[onnx.ModelProto, ModelFile]:
    """The builder's own (unlowered) gradient graph: the reference the lowering is checked
    against, and the onnxruntime-training contender in the benchmarks."""
    mf = source if isinstance(source, ModelFile) else read_model(source)
    fwd = prepass(mf.model, mf.input_name)
    headed = _with_head(fwd, mf, infer_shapes(fwd), None)
    return _build(headed, mf, None, rule, "model"), mf


def _with_head(fwd, mf: ModelFile, shapes, tap) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(fwd)
    head.add_head(m, mf.output_name, mf.num_classes, mf.batch_dim)
    if tap:
        dims = list(shapes[tap])
        dims[0] = mf.batch_dim
        head.add_tap(m, tap, dims)
    m.ir_version = min(m.ir_version, MAX_IR_VERSION)
    return m


def _build(headed, mf, tap, rule, where) -> onnx.ModelProto:
    wrt = [mf.input_name] + ([head.TAP_DELTA] if tap else [])
    with scratch_dir("build-") as tmp:
        src, dst = Path(tmp) / "head.onnx", Path(tmp) / "grad.onnx"
        onnx.save(headed, src)
        try:
            builder.call(
                {
                    "op": "build",
                    "model": str(src),
                    "output": str(dst),
                    "loss": head.LOSS,
                    "wrt": wrt,
                    "rule": rule,
                }
            )
        except builder.BuilderError as e:
            raise _explain_build_failure(e, headed, where) from e
        return onnx.load(dst)


def _explain_build_failure(e, model, where):
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


def _finish(built: onnx.ModelProto, info: CompiledInfo, mf: ModelFile) -> None:
    g = built.graph
    wanted = [info.logits, info.scores, info.input_gradient]
    if info.tap:
        wanted += [info.tap, info.tap_gradient]
    by_name = {o.name: o for o in g.output}
    outs = []
    for name in wanted:
        if name in by_name:
            outs.append(by_name[name])
        else:
            outs.append(onnx.helper.make_empty_tensor_value_info(name))
    del g.output[:]
    g.output.extend(outs)
    eliminate_dead_code(built)
    topological_sort(built)
    prune_opset_imports(built)
    lower_opset_to_13(built, opset_version(built))
    built.ir_version = min(built.ir_version, MAX_IR_VERSION)
    del built.metadata_props[:]
    built.metadata_props.extend(mf.model.metadata_props)
    _set_meta(built, info)
    try:
        onnx.checker.check_model(built)
    except onnx.checker.ValidationError as e:
        raise LoweringError(f"lowered gradient graph failed onnx.checker: {e}") from e
    bad = sorted({f"{n.domain}::{n.op_type}" for n in g.node if n.domain not in ("", "ai.onnx")})
    if bad:
        raise LoweringError(f"lowered gradient graph still holds non-standard ops: {bad}")


def _set_meta(model: onnx.ModelProto, info: CompiledInfo) -> None:
    keep = [p for p in model.metadata_props if p.key != GRADIENT_META]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    model.metadata_props.add(key=GRADIENT_META, value=json.dumps(asdict(info)))


def compile_to_file(source, output, **kwargs) -> CompiledInfo:
    """Compile and write a standalone gradient model atomically (compile once, explain anywhere)."""
    from ..atomic import atomic_write_bytes, refuse_overwrite

    mf = source if isinstance(source, ModelFile) else read_model(source)
    refuse_overwrite(output, [mf.path, *mf.data_files], option="output")
    model, info = compile_model(mf, **kwargs)
    atomic_write_bytes(Path(output), model.SerializeToString())
    return info
