"""Self-check: the lowered graph against the builder's own graph on random inputs.

The builder's runtime has wrong kernels for a few ops (design/lowering.md), and crashes on
AveragePoolGrad with a symbolic batch, so the check builds a static-batch copy and skips the
known-bad cases, which the test suite checks against torch instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from . import builder, head
from .graph import attrs
from .lower import LoweringError
from .scratch import scratch_dir

CHECK_BATCH = 2
FLOOR = 1e-6  # the least tolerance, relative to the largest |gradient| (zoo: errors <= 2e-7)


def tolerance(model: onnx.ModelProto) -> float:
    """Max abs error relative to the largest |gradient| that float32 rounding explains.

    The lowered graph and the builder's compute the same sums in a different order (the
    lowering's Convs against the builder's ConvGrad kernels, masks as products, fused vs unfused
    ops), so their difference is a float32 rounding error that grows with the number of
    operations it passes through; treated as a random walk of one rounding (2^-23) per node,
    4 standard deviations: 4 · 2^-23 · sqrt(nodes). EfficientNet-Lite0's DeconvNet graph
    (about 400 nodes: 9.5e-6) differs by 3.4e-6; a wrong lowering differs by 1e-2 or more."""
    return max(FLOOR, 4 * float(np.finfo(np.float32).eps) * float(np.sqrt(len(model.graph.node))))


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
        if n.op_type == "Slice" and len(n.input) > 4:
            reasons.append(f"{n.name}: SliceGrad with steps (negative steps are wrong in the builder)")
    return reasons


def _static_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in list(m.graph.input) + list(m.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if len(dims) and not dims[0].HasField("dim_value") and vi.name != head.OUTPUT_MIX:
            dims[0].dim_value = batch
    return m


def self_check(lowered, headed, mf, info, where: str, seed: int = 0) -> dict:
    reasons = known_bad_kernels(headed)
    if reasons:
        return {"status": "skipped", "reason": "; ".join(reasons[:3])}
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    # A model whose batch is fixed (at 1, say) is checked at that batch.
    batch = mf.input_dims[0] if isinstance(mf.input_dims[0], int) else CHECK_BATCH
    static = _static_batch(headed, batch)
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
                "rule": info.rule,
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
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(lowered.SerializeToString(), so, providers=["CPUExecutionProvider"])
    got = dict(zip(outputs, sess.run(outputs, feeds)))
    tol = tolerance(lowered)
    report = {"status": "passed", "batch": batch, "seed": seed, "tolerance": tol}
    for name in outputs:
        ref, val = reference[name], got[name]
        scale = float(np.max(np.abs(ref))) or 1.0
        err = float(np.max(np.abs(ref - val)))
        report[name] = {"max_abs_error": err, "scale": scale}
        if not np.isfinite(err) or err > tol * scale:
            raise LoweringError(
                f"{where}: self-check failed for {name}: max abs error {err:.3g} vs the builder's graph "
                f"(scale {scale:.3g}, tolerance {tol:.3g} relative: float32 rounding over "
                f"{len(lowered.graph.node)} nodes)"
            )
    return report
