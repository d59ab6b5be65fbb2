"""What every exporter shares: graph naming, the parity check, metadata and the atomic write.

An exporter turns a framework model into an ``onnx.ModelProto`` and hands it to :func:`finish`,
which refuses the model unless onnxruntime reproduces the framework's logits on random inputs,
then writes it in one step. A refused model never reaches the disk, so a half-written or wrong
file can never be mistaken for a good one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from engine import metadata
from engine.atomic import atomic_write_bytes

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_DIM = "batch"
# onnxruntime-training 1.19.2 (the gradient builder) reads IR versions up to 10; onnx >= 1.17
# stamps 11 on new models although nothing in them needs it.
MAX_IR_VERSION = 10
PARITY_BATCH = 3  # differs from the batch used for tracing, so the dynamic batch axis is exercised


class ExportParityError(ValueError):
    """The exported graph does not reproduce the framework's logits; nothing was written."""


@dataclass(frozen=True)
class ExportReport:
    """What an export produced and how closely onnxruntime reproduced the framework."""

    path: Path
    max_abs_diff: float  # max |onnxruntime logits - framework logits| on the parity batch
    tolerance: float  # the absolute tolerance it was held to
    opset: int
    ir_version: int
    num_classes: int
    source_framework: str = ""

    def __str__(self) -> str:
        source = self.source_framework or "framework"
        return (
            f"{self.path}: opset {self.opset}, IR {self.ir_version}, {self.num_classes} classes; "
            f"max |onnxruntime - {source}| = {self.max_abs_diff:.3g} "
            f"(tolerance {self.tolerance:.3g})"
        )


def default_tolerance(reference: np.ndarray, rtol: float) -> float:
    """``rtol * max(1, max|logits|)``: relative to the logit scale, never tighter than ``rtol``."""
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    return rtol * max(1.0, scale)


def random_inputs(
    batch: int, input_shape: Sequence[int], input_range: tuple[float, float], seed: int
) -> np.ndarray:
    """Uniform float32 samples in ``input_range``, shape ``(batch, *input_shape)``."""
    lo, hi = input_range
    rng = np.random.default_rng(seed)
    return rng.uniform(lo, hi, size=(batch, *input_shape)).astype(np.float32)


def check_arguments(
    input_shape: Sequence[int],
    input_range: tuple[float, float],
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    channels: int,
) -> None:
    """Refuse inconsistent export arguments before any framework work is done."""
    if not input_shape or any(int(d) <= 0 for d in input_shape):
        raise ValueError(f"input_shape must be positive sizes without the batch axis, got {input_shape}")
    lo, hi = input_range
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise ValueError(f"input_range must be finite (low, high) with low < high, got {input_range}")
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    if mean is not None:
        if len(mean) != channels or len(std) != channels:
            raise ValueError(
                f"mean and std need one value per channel ({channels}), got {len(mean)} and {len(std)}"
            )
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {list(std)}")


def preprocessing_record(mean: Sequence[float] | None, std: Sequence[float] | None) -> dict:
    """The ``preprocessing`` metadata for a normalisation baked into the graph (``in_graph``: the
    runtime must not normalise again; the ONNX input is the raw image)."""
    if mean is None:
        return {}
    return {"mean": [float(m) for m in mean], "std": [float(s) for s in std], "in_graph": True}


def rename_value(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename tensor ``old`` to ``new`` everywhere in ``graph`` (not in subgraphs: exporters
    rename only the graph's own input and output, which subgraphs see by the outer name)."""
    if old == new:
        return
    taken = {v.name for v in (*graph.input, *graph.output, *graph.value_info, *graph.initializer)}
    taken.update(o for n in graph.node for o in n.output)
    if new in taken:
        raise ValueError(f"cannot rename {old!r} to {new!r}: the graph already has a {new!r}")
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.name == old:
            value.name = new


def name_batch_axis(value: onnx.ValueInfoProto) -> None:
    """Make axis 0 of a graph input/output the symbolic dimension ``batch``."""
    dim = value.type.tensor_type.shape.dim[0]
    dim.Clear()
    dim.dim_param = BATCH_DIM


def _run_onnx(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    """Logits from onnxruntime on the CPU provider (the reference runtime for the parity check)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    # The parity batch is tiny; one thread keeps the check deterministic and polite to neighbours.
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]


def parity(
    model_bytes: bytes,
    reference: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    *,
    atol: float | None,
    rtol: float,
    framework: str,
) -> tuple[float, float, int]:
    """Compare onnxruntime with the framework on ``x``.

    Returns ``(max_abs_diff, tolerance, num_classes)``; raises :class:`ExportParityError` with
    both numbers when the difference exceeds the tolerance, and for non-finite or misshapen logits.
    """
    expected = np.asarray(reference(x), dtype=np.float64)
    got = np.asarray(_run_onnx(model_bytes, x), dtype=np.float64)
    if expected.ndim != 2 or expected.shape[0] != x.shape[0]:
        raise ExportParityError(
            f"the {framework} model must return logits of shape (batch, classes); "
            f"got {expected.shape} for a batch of {x.shape[0]}"
        )
    if got.shape != expected.shape:
        raise ExportParityError(
            f"onnxruntime returned logits of shape {got.shape}, {framework} {expected.shape}"
        )
    if not np.all(np.isfinite(expected)):
        raise ExportParityError(f"the {framework} model returned non-finite logits on random inputs")
    tolerance = float(atol) if atol is not None else default_tolerance(expected, rtol)
    diff = float(np.max(np.abs(got - expected))) if np.all(np.isfinite(got)) else float("inf")
    if not diff <= tolerance:
        raise ExportParityError(
            f"export refused: onnxruntime and {framework} disagree on {x.shape[0]} random inputs, "
            f"max abs difference {diff:.6g} > tolerance {tolerance:.6g} "
            f"(logit scale {float(np.max(np.abs(expected))):.4g}); no file was written"
        )
    return diff, tolerance, expected.shape[1]


def finish(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    reference: Callable[[np.ndarray], np.ndarray],
    input_shape: Sequence[int],
    input_range: tuple[float, float],
    info: metadata.ModelInfo,
    atol: float | None,
    rtol: float,
    seed: int,
) -> ExportReport:
    """Check ``model`` against ``reference`` (the framework, numpy in, logits out) and write it.

    ``model`` must already have one input ``input`` and one output ``logits`` with a symbolic
    batch axis. Caps the IR version, checks the graph, runs the parity check on
    ``PARITY_BATCH`` seeded random inputs in ``input_range``, records ``info`` plus the measured
    difference as metadata, and writes atomically. Raises :class:`ExportParityError` (nothing
    written) when onnxruntime disagrees with the framework.
    """
    path = Path(path)
    names_in = [v.name for v in model.graph.input if v.name not in _initializer_names(model)]
    names_out = [v.name for v in model.graph.output]
    if names_in != [INPUT_NAME] or names_out != [OUTPUT_NAME]:
        raise ValueError(f"expected graph input ['input'] and output ['logits'], got {names_in}, {names_out}")
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    onnx.checker.check_model(model)

    x = random_inputs(PARITY_BATCH, input_shape, input_range, seed + 1)
    diff, tolerance, num_classes = parity(
        model.SerializeToString(),
        reference,
        x,
        atol=atol,
        rtol=rtol,
        framework=info.source_framework or "the framework",
    )
    if info.labels is not None and len(info.labels) != num_classes:
        raise ValueError(f"{len(info.labels)} labels given for a model with {num_classes} classes")
    info.input_range = (float(input_range[0]), float(input_range[1]))
    info.export_max_abs_diff = diff
    metadata.write(model, info)
    atomic_write_bytes(path, model.SerializeToString())
    return ExportReport(
        path=path,
        max_abs_diff=diff,
        tolerance=tolerance,
        opset=_default_opset(model),
        ir_version=model.ir_version,
        num_classes=num_classes,
        source_framework=info.source_framework or "",
    )


def _initializer_names(model: onnx.ModelProto) -> set[str]:
    return {t.name for t in model.graph.initializer}


def _default_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
