"""Keras 3 (TensorFlow backend) -> ONNX via tf2onnx, checked against Keras itself.

Functional, Sequential and subclassed models all go through one path: a ``tf.function`` with a
dynamic-batch ``TensorSpec`` handed to ``tf2onnx.convert.from_function`` (tf2onnx's
``from_keras`` fails on Keras 3 Sequential models). TensorFlow is imported inside the functions
so ``import exporters`` stays cheap.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx

from engine import metadata
from exporters import _common

MIN_OPSET, MAX_OPSET = 13, 18  # tf2onnx 1.17 writes up to opset 18


def export(
    model: Any,
    path: str | os.PathLike,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    labels: Sequence[str] | None = None,
    input_shape: Sequence[int] | None = None,
    input_range: tuple[float, float] = (0.0, 1.0),
    opset: int = 17,
    atol: float | None = None,
    rtol: float = 1e-4,
    seed: int = 0,
) -> _common.ExportReport:
    """Export a Keras 3 classifier to ``path`` and prove the file reproduces it.

    Args:
        model: a built ``keras.Model`` (Functional, Sequential or subclassed) with one float
            input mapping ``(N, *input_shape)`` to logits ``(N, K)``; called with
            ``training=False``.
        mean, std: per-channel normalisation on the last axis (channels-last). When given,
            ``(x - mean) / std`` becomes part of the graph and the ONNX input is the
            un-normalised image in ``input_range`` (normally [0, 1]).
        labels: ``K`` class names stored in the metadata.
        input_shape: one example without the batch axis, e.g. ``(224, 224, 3)``; read from
            ``model.inputs`` when the model has them (subclassed models do not).
        input_range: value range of the ONNX input; the parity check samples from it.
        opset: ONNX opset, 13 to 18.
        atol: absolute tolerance of the parity check; default ``rtol * max(1, max|logits|)``,
            i.e. relative to the logit scale of the parity batch.
        rtol: see ``atol``.
        seed: seeds the parity inputs.

    The graph has input ``input`` and output ``logits`` with a symbolic batch axis, IR
    version <= 10, and ``onnxplain.*`` metadata (layout ``NHWC`` for 4-D inputs, else none).
    Raises :class:`exporters.ExportParityError` and writes nothing when onnxruntime's logits on
    3 seeded random inputs differ from Keras's by more than the tolerance.
    """
    import keras
    import tensorflow as tf

    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            f"the Keras exporter needs the TensorFlow backend, this process uses "
            f"{keras.backend.backend()!r} (set KERAS_BACKEND=tensorflow)"
        )
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset must be in [{MIN_OPSET}, {MAX_OPSET}], got {opset}")
    input_shape = _input_shape(model, input_shape)
    _common.check_arguments(input_shape, input_range, mean, std, channels=input_shape[-1])

    spec = tf.TensorSpec((None, *input_shape), tf.float32, name=_common.INPUT_NAME)
    if mean is None:

        @tf.function(input_signature=[spec])
        def logits(x):
            return model(x, training=False)

    else:
        # numpy, not tf.constant: an eager tensor would be captured by the tf.function and
        # become an extra graph input in tf2onnx; a numpy array becomes a Const node.
        mean_t = np.asarray(mean, np.float32)
        std_t = np.asarray(std, np.float32)

        @tf.function(input_signature=[spec])
        def logits(x):
            return model((x - mean_t) / std_t, training=False)

    proto = _convert(logits, spec, opset)

    def reference(x: np.ndarray) -> np.ndarray:
        return logits(tf.constant(x)).numpy()

    info = metadata.ModelInfo(
        layout="NHWC" if len(input_shape) == 3 else None,
        labels=list(labels) if labels is not None else None,
        preprocessing=_common.preprocessing_record(mean, std),
        source_framework="keras",
        source_framework_version=f"keras {keras.__version__}, tensorflow {tf.__version__}",
    )
    return _common.finish(
        proto,
        path,
        reference=reference,
        input_shape=input_shape,
        input_range=input_range,
        info=info,
        atol=atol,
        rtol=rtol,
        seed=seed,
    )


def _input_shape(model: Any, given: Sequence[int] | None) -> tuple[int, ...]:
    declared = None
    inputs = getattr(model, "inputs", None)  # Functional and Sequential models; not subclassed
    if inputs:
        if len(inputs) != 1:
            raise ValueError(f"the model has {len(inputs)} inputs; only one is supported")
        declared = tuple(inputs[0].shape[1:])
        if None in declared:
            declared = None
    if given is not None:
        given = tuple(int(d) for d in given)
        if declared is not None and given != declared:
            raise ValueError(f"input_shape {given} differs from the model's input shape {declared}")
        return given
    if declared is None:
        raise ValueError("the model declares no fixed input shape (e.g. subclassed); pass input_shape")
    return declared


def _convert(fn: Any, spec: Any, opset: int) -> onnx.ModelProto:
    import tf2onnx

    logger = logging.getLogger("tf2onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)  # tf2onnx logs every optimiser pass at INFO
    try:
        proto, _ = tf2onnx.convert.from_function(fn, input_signature=[spec], opset=opset)
    finally:
        logger.setLevel(level)

    graph = proto.graph
    _bind_captures(fn, spec, graph)
    if len(graph.input) != 1 or len(graph.output) != 1:
        raise ValueError(
            f"expected one input and one output after conversion, got "
            f"{[v.name for v in graph.input]} -> {[v.name for v in graph.output]}"
        )
    # tf2onnx names the output after the function's last TF op ("Identity:0") and the batch
    # axes "unk__N"; the engine expects input/logits and a shared "batch" axis.
    _common.rename_value(graph, graph.input[0].name, _common.INPUT_NAME)
    _common.rename_value(graph, graph.output[0].name, _common.OUTPUT_NAME)
    _common.name_batch_axis(graph.input[0])
    _common.name_batch_axis(graph.output[0])
    _fix_class_dim(fn, spec, graph.output[0])
    return proto


def _bind_captures(fn: Any, spec: Any, graph: onnx.GraphProto) -> None:
    """Tensors the tf.function captured (a Keras ``Normalization`` layer's mean and variance, any
    eager constant) come out of tf2onnx as extra graph inputs: bind each to its captured value as
    an initializer, so the model has the one image input it is called with."""
    import tensorflow as tf
    from onnx import numpy_helper

    concrete = fn.get_concrete_function(spec)
    values = {}
    for external, internal in zip(concrete.captured_inputs, concrete.graph.internal_captures):
        if external.dtype != tf.resource:  # variables are frozen by tf2onnx already
            values[internal.name] = np.asarray(external.numpy())
    extra = [vi for vi in graph.input if vi.name in values]
    for vi in extra:
        graph.initializer.append(numpy_helper.from_array(values[vi.name], vi.name))
        graph.input.remove(vi)


def _fix_class_dim(fn: Any, spec: Any, output: onnx.ValueInfoProto) -> None:
    """A symbolic class dimension becomes the number of classes the model gives."""
    import tensorflow as tf

    dims = output.type.tensor_type.shape.dim
    if len(dims) == 2 and not dims[1].HasField("dim_value"):
        probe = np.zeros((1, *spec.shape[1:]), np.float32)
        dims[1].dim_value = int(fn(tf.constant(probe)).shape[-1])
