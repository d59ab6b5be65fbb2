"""The attribution compiler: ONNX classifier -> standard-ONNX input-gradient model.

One ordered pass list (``engine.compile.passes.COMPILE_PASSES``): opset upgrade, folding, the
forward rewrites (``rewrites/``), the loss head (+ tap), GradientGraphBuilder (builder
interpreter), the lowerings (``lowering/``), dead-code elimination, opset pruning; then
onnx.checker and the self-check against the builder's own graph. The onnxruntime-specific
rewrites (``tuning/``) run at load. Which passes fired, and how often, is recorded in the
model's metadata (``CompiledInfo.passes``). See design/ARCHITECTURE.md and design/lowering.md.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from .. import __version__
from ..errors import InputError, LoweringError, UnsupportedModelError
from ..modelfile import ModelFile, read_model
from . import builder, head
from .domains import MAX_IR_VERSION, STANDARD_DOMAINS
from .passes import COMPILE_PASSES, Compilation, passes_until, run_passes
from .rules import BACKWARD_RULES

# Bump when the generated graphs change, so cached gradient models are rebuilt.
# 11: Resize, ReduceProd, CumSum, Atan..., Einsum as MatMuls, measured pool dims, OpenVINO fix-ups;
# 10: the pass list, recorded in CompiledInfo.passes (graphs unchanged); 9: portable graph with
# onnxruntime rewrites at load; activation/InstanceNorm/Pad rewrites, constant folding, DivGrad
# (7: QDQ straight-through)
COMPILER_VERSION = "11"
GRADIENT_META = "onnxplain.gradient"

__all__ = [
    "CompiledInfo",
    "compile_model",
    "compile_to_file",
    "LoweringError",
    "UnsupportedModelError",
    "BuilderError",
    "GRADIENT_META",
    "MAX_IR_VERSION",
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
    # The compile passes that fired, in order, with how often ({"rewrite/BatchNormalization": 3,
    # "build": 1, "lower/ConvGrad": 5, ...}; engine.compile.passes)
    passes: dict = field(default_factory=dict)

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
    if rule not in BACKWARD_RULES:
        raise InputError(f"unknown backward rule {rule!r}; use {', '.join(BACKWARD_RULES)}")
    c = Compilation(source=mf, model=mf.model, where=where, rule=rule, layer=layer)
    fired = run_passes(COMPILE_PASSES, c)
    built = c.model
    lowered_ops = list(c.lowered_ops)
    if c.qdq_pairs:
        lowered_ops.append("QuantizeLinear+DequantizeLinear (straight-through)")
    tap = c.tap
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
        passes=fired,
    )
    _finish(built, info, mf)
    if self_check:
        from .selfcheck import self_check as run_check

        info.self_check = run_check(built, c.headed, mf, info, where)
    else:  # recorded, so a gradient model that was never checked says so
        info.self_check = {"status": "not run", "reason": "disabled (self_check=False)"}
    _set_meta(built, info)
    return built, info


def builder_graph(source, *, rule: str = "gradient") -> tuple[onnx.ModelProto, ModelFile]:
    """The builder's own (unlowered) gradient graph: the reference the lowering is checked
    against, and the onnxruntime-training contender in the benchmarks (the compile passes up to
    the build, without the quantized pairs' bypass)."""
    mf = source if isinstance(source, ModelFile) else read_model(source)
    c = Compilation(source=mf, model=mf.model, rule=rule)
    run_passes(passes_until("build", skip=("ste_bypass",)), c)
    return c.model, mf


def _finish(built: onnx.ModelProto, info: CompiledInfo, mf: ModelFile) -> None:
    """Metadata and the checks of the lowered graph (the passes have shaped it)."""
    g = built.graph
    built.ir_version = min(built.ir_version, MAX_IR_VERSION)
    del built.metadata_props[:]
    built.metadata_props.extend(mf.model.metadata_props)
    _set_meta(built, info)
    try:
        onnx.checker.check_model(built)
    except onnx.checker.ValidationError as e:
        raise LoweringError(f"lowered gradient graph failed onnx.checker: {e}") from e
    bad = sorted({f"{n.domain}::{n.op_type}" for n in g.node if n.domain not in STANDARD_DOMAINS})
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
