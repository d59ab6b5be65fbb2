"""Self-check: the lowered graph against the builder's own graph on random inputs.

The builder's runtime has wrong kernels for a few ops (design/lowering.md), and crashes on
AveragePoolGrad with a symbolic batch, so the check builds a static-batch copy and skips the
known-bad cases, which the test suite checks against torch instead, recording the reason. The
tolerance is derived from float32 rounding of the graph (tolerance(); docs/compiler-coverage.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from ..errors import LoweringError
from . import builder, head, static_shapes
from .graph import attrs
from .rules import gradient_definitions
from .scratch import scratch_dir

CHECK_BATCH = 2
# The check passes when max |lowered - builder| <= tolerance x max |builder|, with the tolerance
# derived from float32 rounding of this graph (see tolerance()): never below FLOOR (measured
# <= 2e-7 on the zoo), and above it where the graph is deep or its own rounding spread is large
# (13 real architectures matched the framework to ~1e-6 yet differed from the builder's kernels by
# 1.0e-6 to 1.6e-6, which a constant 1e-6 refused).
FLOOR = 1e-6
SPREAD_FACTOR = 8  # times the spread between two onnxruntime optimisation levels on the same graph
FLOAT32_EPS = float(np.finfo(np.float32).eps)


def known_bad_kernels(model: onnx.ModelProto) -> list[str]:
    """Ops whose builder kernels are wrong (the lowering is right; torch agrees)."""
    reasons = []
    for n in model.graph.node:
        a = attrs(n)
        auto_pad = a.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if n.op_type == "Conv" and auto_pad.startswith("SAME"):
            reasons.append(f"{n.name}: ConvGrad with auto_pad {auto_pad}")
        if n.op_type == "AveragePool":
            if len(a.get("kernel_shape", [])) == 3:
                reasons.append(f"{n.name}: 3-D AveragePoolGrad")
            if a.get("ceil_mode", 0) and a.get("count_include_pad", 0):
                reasons.append(f"{n.name}: AveragePool ceil_mode with count_include_pad")
        if n.op_type == "ConvTranspose":
            reasons.append(f"{n.name}: the builder's runtime has no ConvTransposeGrad kernel")
        if n.op_type == "DequantizeLinear":
            reasons.append(
                f"{n.name}: the builder's runtime crashes (SIGSEGV) on gradient graphs of QDQ models; "
                "tests/test_quantized.py checks them against torch's FakeQuantize"
            )
            break
        if (
            n.op_type == "Slice"
            and len(n.input) > 4
            and n.input[4]
            and not _positive_steps(model, n.input[4])
        ):
            # torch writes a steps input on every slice; only negative (or unknown) steps are wrong
            reasons.append(f"{n.name}: SliceGrad with negative or computed steps (wrong in the builder)")
    return reasons


def _positive_steps(model: onnx.ModelProto, name: str) -> bool:
    from .graph import GraphContext

    steps = GraphContext(model, {}).const_value(name)
    return steps is not None and bool(np.all(steps > 0))


def graph_depth(model: onnx.ModelProto, output: str) -> int:
    """Nodes on the longest path from any graph input or initializer to ``output``."""
    depth: dict[str, int] = {}
    for n in model.graph.node:  # topologically sorted by the compiler
        d = 1 + max((depth.get(i, 0) for i in n.input if i), default=0)
        for o in n.output:
            depth[o] = d
    return depth.get(output, 0)


def tolerance(depth: int, spread: float) -> float:
    """Relative tolerance from float32 rounding: sqrt(depth) eps (independent roundings along the
    longest path add up like a random walk), or SPREAD_FACTOR times the measured spread of the
    same graph under two onnxruntime optimisation levels (different kernels and summation
    orders), never below FLOOR."""
    return max(FLOOR, float(np.sqrt(depth)) * FLOAT32_EPS, SPREAD_FACTOR * spread)


def _static_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in list(m.graph.input) + list(m.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if len(dims) and not dims[0].HasField("dim_value") and vi.name != head.OUTPUT_MIX:
            dims[0].dim_value = batch
    return m


def _with_measured_pool_dims(model: onnx.ModelProto, input_name: str) -> None:
    """Write the AveragePool inputs' dims, measured by running the forward, into value_info: the
    builder's AveragePoolGrad kernel needs them, and without them the check could not run."""
    from .graph import infer_shapes

    shapes = infer_shapes(model)
    if not static_shapes.measure(model, input_name, shapes):
        return
    wanted = {n.input[0] for n in model.graph.node if n.op_type == "AveragePool"}
    kept = [vi for vi in model.graph.value_info if vi.name not in wanted]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    for name in sorted(wanted):
        dims = shapes.get(name)
        if dims and all(isinstance(d, int) for d in dims):
            model.graph.value_info.append(
                onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, dims)
            )


def self_check(lowered, headed, mf, info, where: str, seed: int = 0) -> dict:
    reasons = known_bad_kernels(headed)
    if reasons:
        return {"status": "skipped", "reason": "; ".join(reasons[:3])}
    # A model whose batch is fixed (at 1, say) is checked at that batch.
    batch = mf.input_dims[0] if isinstance(mf.input_dims[0], int) else CHECK_BATCH
    static = _static_batch(headed, batch)
    if static_shapes.unknown_pool_dims(static):
        _with_measured_pool_dims(static, mf.input_name)
    reasons = static_shapes.unknown_pool_dims(static)
    if reasons:
        return {"status": "skipped", "reason": "; ".join(reasons[:3])}
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    dims = [batch] + [int(d) if isinstance(d, int) else 1 for d in mf.input_dims[1:]]
    feeds = {
        mf.input_name: rng.uniform(0, 1, size=dims).astype(np.float32),
        head.CLASS_WEIGHTS: np.eye(mf.num_classes, dtype=np.float32)[rng.integers(0, mf.num_classes, batch)],
        head.OUTPUT_MIX: np.array([0.3, 0.5, 0.2], np.float32),
    }
    outputs = [info.input_gradient, info.scores]
    if info.tap:
        tap_dims = [
            d.dim_value
            for d in next(
                i for i in static.graph.input if i.name == head.TAP_DELTA
            ).type.tensor_type.shape.dim
        ]
        feeds[head.TAP_DELTA] = np.zeros(tap_dims, np.float32)
        outputs.append(info.tap_gradient)
    with scratch_dir("check-") as tmp:
        t = Path(tmp)
        onnx.save(static, t / "head.onnx")
        builder.call(
            {
                "op": "build",
                "model": str(t / "head.onnx"),
                "output": str(t / "grad.onnx"),
                "loss": head.LOSS,
                "wrt": [mf.input_name] + ([head.TAP_DELTA] if info.tap else []),
                "gradients": gradient_definitions(info.rule),
            }
        )
        np.savez(t / "feeds.npz", **feeds)
        builder.call(
            {
                "op": "run",
                "model": str(t / "grad.onnx"),
                "feeds": str(t / "feeds.npz"),
                "outputs": outputs,
                "result": str(t / "ref.npz"),
            }
        )
        reference = dict(np.load(t / "ref.npz"))
    got = _run(lowered, feeds, outputs, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    plain = _run(lowered, feeds, outputs, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    depth = graph_depth(lowered, info.input_gradient)
    report = {"status": "passed", "batch": batch, "seed": seed, "depth": depth}
    for name in outputs:
        ref, val = reference[name], got[name]
        scale = float(np.max(np.abs(ref))) or 1.0
        err = float(np.max(np.abs(ref - val)))
        spread = float(np.max(np.abs(plain[name] - val))) / scale
        tol = tolerance(depth, spread if np.isfinite(spread) else 0.0)
        report[name] = {"max_abs_error": err, "scale": scale, "spread": spread, "tolerance": tol}
        if not np.isfinite(err) or err > tol * scale:
            raise LoweringError(
                f"{where}: self-check failed for {name}: max abs error {err:.3g} vs the builder's graph "
                f"(scale {scale:.3g}, tolerance {tol:.3g} relative: depth {depth}, optimisation-level "
                f"spread {spread:.3g})"
            )
    return report


def _run(model: onnx.ModelProto, feeds: dict, outputs: list, level) -> dict:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = level
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return dict(zip(outputs, sess.run(outputs, feeds)))
