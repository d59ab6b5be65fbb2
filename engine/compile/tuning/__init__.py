"""Rewrites tuned for one runtime, applied when that runtime loads a portable gradient model.

``onnxplain compile`` (and the cache) write a graph that every conforming ONNX runtime runs
exactly. Two rewrites make onnxruntime's CPU provider much faster and are exact there, because its
blocked (NCHWc) kernels compute each product and sum in float32 as written:

- ``conv_masks`` (masks.py): activation masks (1[lo < y < hi] of ReLU/ReLU6/HardSigmoid backward)
  as 1×1 depthwise Convs with power-of-two constants near the float32 limit, so the mask stays in
  NCHWc;
- ``upsample_broadcasts`` (broadcasts.py): GlobalAveragePool's backward broadcast (N, C, 1, 1) ->
  (N, C, H, W) as a nearest Resize, which has an NCHWc kernel, instead of Expand.

Both rely on float32 arithmetic done exactly as written; a runtime that reassociates or fuses
(OpenVINO's CPU plugin: gradients wrong by a factor of 3e6 on EfficientNet-Lite0) must get the
portable graph. So the Classifier applies them only when it builds an onnxruntime session, and
records what fired in the model's metadata (``CompiledInfo.tuned``: the runtime and every tuning
pass of ``engine.compile.passes.TUNING_PASSES`` with its count). ``opset13.py`` holds the
opset-13 declaration, which compile applies to the portable graph itself.
"""

from __future__ import annotations

import onnx

__all__ = ["tune_for_onnxruntime"]


def tune_for_onnxruntime(data: bytes) -> bytes:
    """The onnxruntime-tuned form of a portable gradient model (``data`` as serialized bytes).
    A model already tuned, or without onnxplain metadata, comes back unchanged."""
    from .. import CompiledInfo, _set_meta
    from ..passes import TUNING_PASSES, Tuning, run_passes

    model = onnx.load_from_string(data)
    info = CompiledInfo.from_model(model)
    if info is None or info.tuned:
        return data
    fired = run_passes(TUNING_PASSES, Tuning(model), keep_zero=True)
    info.tuned = {"runtime": "onnxruntime", **fired}
    _set_meta(model, info)
    return model.SerializeToString()
