"""PyTorch -> ONNX, checked against PyTorch itself.

Uses the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``): it gives plain,
stable op sets for the convolutional and transformer classifiers the engine targets. torch is
imported inside the functions so ``import exporters`` stays cheap.
"""

from __future__ import annotations

import functools
import io
import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx

from engine import metadata
from exporters import _common

if TYPE_CHECKING:
    import torch

MIN_OPSET, MAX_OPSET = 13, 20  # Softmax semantics change at 13; the builder reads up to 21


def export(
    module: torch.nn.Module,
    path: str | os.PathLike,
    *,
    input_shape: Sequence[int],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    labels: Sequence[str] | None = None,
    input_range: tuple[float, float] = (0.0, 1.0),
    opset: int = 17,
    keep_batchnorm: bool = False,
    atol: float | None = None,
    rtol: float = 1e-4,
    seed: int = 0,
) -> _common.ExportReport:
    """Export a PyTorch classifier to ``path`` and prove the file reproduces it.

    Args:
        module: maps float32 ``(N, *input_shape)`` to logits ``(N, K)``; exported in eval mode
            (its own mode is restored afterwards).
        input_shape: one example without the batch axis, e.g. ``(3, 224, 224)``; the ONNX batch
            axis is symbolic (``batch``).
        mean, std: per-channel normalisation (channel axis 1). When given, ``(x - mean) / std``
            becomes part of the graph, so the ONNX input is the un-normalised image in
            ``input_range`` (normally [0, 1]) and attributions are in image space.
        labels: ``K`` class names stored in the metadata.
        input_range: value range of the ONNX input; the parity check samples from it.
        opset: ONNX opset, 13 to 20.
        keep_batchnorm: keep ``BatchNormalization`` nodes instead of folding them into the
            preceding convolution.
        atol: absolute tolerance of the parity check; default ``rtol * max(1, max|logits|)``,
            i.e. relative to the logit scale of the parity batch.
        rtol: see ``atol``.
        seed: seeds the tracing example and the parity inputs.

    The graph has input ``input`` and output ``logits``, IR version <= 10, and ``onnxplain.*``
    metadata (layout ``NCHW`` for 4-D inputs, else none; input range; labels; preprocessing;
    source framework and version; measured difference). Raises
    :class:`exporters.ExportParityError` and writes nothing when onnxruntime's logits on
    3 seeded random inputs differ from torch's by more than the tolerance.
    """
    import torch

    input_shape = tuple(int(d) for d in input_shape)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset must be in [{MIN_OPSET}, {MAX_OPSET}], got {opset}")
    _common.check_arguments(input_shape, input_range, mean, std, channels=input_shape[0])

    wrapped = module if mean is None else normalized(module, mean, std, ndim=len(input_shape))
    was_training = module.training
    # Trace and compare on the module's own device (a CUDA module stays on CUDA).
    device = next(iter(wrapped.parameters()), torch.empty(0)).device
    wrapped.to(device)  # the normalisation buffers follow the module
    wrapped.eval()
    try:
        proto = _trace(wrapped, input_shape, input_range, opset, keep_batchnorm, seed, device)

        def reference(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return wrapped(torch.from_numpy(x).to(device)).detach().cpu().numpy()

        info = metadata.ModelInfo(
            layout="NCHW" if len(input_shape) == 3 else None,
            labels=list(labels) if labels is not None else None,
            preprocessing=_common.preprocessing_record(mean, std),
            source_framework="torch",
            source_framework_version=torch.__version__,
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
    finally:
        module.train(was_training)


def _trace(
    module: torch.nn.Module,
    input_shape: tuple[int, ...],
    input_range: tuple[float, float],
    opset: int,
    keep_batchnorm: bool,
    seed: int,
    device: torch.device,
) -> onnx.ModelProto:
    import torch

    # Batch 2 for tracing: a batch of 1 lets size-1 broadcasts slip into the graph as constants.
    example = torch.from_numpy(_common.random_inputs(2, input_shape, input_range, seed)).to(device)
    # Conv+BatchNorm folding lives in the exporter's eval peephole pass, which runs only for
    # TrainingMode.EVAL. PRESERVE on a module already in eval mode skips that pass, keeps
    # constant folding for everything else, and exports BatchNormalization with
    # training_mode=0 (running statistics).
    mode = torch.onnx.TrainingMode.PRESERVE if keep_batchnorm else torch.onnx.TrainingMode.EVAL
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # Expected: the TorchScript exporter's deprecation notice, and PRESERVE's advice against
        # constant folding (which is about modules in training mode; ours is in eval mode).
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*constant folding be turned off.*")
        # Pads computed by reversing a constant list (F.pad) stay as Slice(step=-1) subgraphs;
        # the graph is still exact, and the parity check below proves it.
        warnings.filterwarnings("ignore", message=".*Only steps=1 can be constant folded.*")
        torch.onnx.export(
            module,
            (example,),
            buffer,
            input_names=[_common.INPUT_NAME],
            output_names=[_common.OUTPUT_NAME],
            dynamic_axes={
                _common.INPUT_NAME: {0: _common.BATCH_DIM},
                _common.OUTPUT_NAME: {0: _common.BATCH_DIM},
            },
            opset_version=opset,
            training=mode,
            do_constant_folding=True,
            dynamo=False,
        )
    return onnx.load_from_string(buffer.getvalue())


@functools.cache
def _normalized_class() -> type:
    import torch

    class _Normalized(torch.nn.Module):
        """``module((x - mean) / std)`` with per-channel statistics on axis 1."""

        def __init__(self, module, mean, std, ndim):
            super().__init__()
            self.module = module
            shape = (-1,) + (1,) * (ndim - 1)
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(shape))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(shape))

        def forward(self, x):
            return self.module((x - self.mean) / self.std)

    return _Normalized


def normalized(
    module: torch.nn.Module, mean: Sequence[float], std: Sequence[float], ndim: int
) -> torch.nn.Module:
    """Wrap ``module`` so it takes un-normalised inputs: ``module((x - mean) / std)``.

    The statistics broadcast over channel axis 1 of ``(N, C, ...)`` inputs; ``ndim`` is the
    number of axes of one example, ``len((C, ...))``.
    """
    return _normalized_class()(module, mean, std, ndim)
