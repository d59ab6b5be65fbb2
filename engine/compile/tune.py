"""Rewrites tuned for one runtime, applied when that runtime loads a portable gradient model.

``onnxplain compile`` (and the cache) write a graph that every conforming ONNX runtime runs
exactly. Two rewrites make onnxruntime's CPU provider much faster and are exact there, because its
blocked (NCHWc) kernels compute each product and sum in float32 as written:

- ``conv_masks``: activation masks (1[lo < y < hi] of ReLU/ReLU6/HardSigmoid backward) as 1×1
  depthwise Convs with power-of-two constants near the float32 limit, so the mask stays in NCHWc;
- ``upsample_broadcasts``: GlobalAveragePool's backward broadcast (N, C, 1, 1) -> (N, C, H, W) as
  a nearest Resize, which has an NCHWc kernel, instead of Expand.

Both rely on float32 arithmetic done exactly as written; a runtime that reassociates or fuses
(OpenVINO's CPU plugin: gradients wrong by a factor of 3e6 on EfficientNet-Lite0) must get the
portable graph. So the Classifier applies them only when it builds an onnxruntime session, and
records what fired in the model's metadata (``CompiledInfo.tuned``).
"""

from __future__ import annotations

import onnx

from .graph import eliminate_dead_code, infer_shapes, opset_version, topological_sort
from .optimize import conv_masks, upsample_broadcasts


def tune_for_onnxruntime(data: bytes) -> bytes:
    """The onnxruntime-tuned form of a portable gradient model (``data`` as serialized bytes).
    A model already tuned, or without onnxplain metadata, comes back unchanged."""
    from . import CompiledInfo, _set_meta

    model = onnx.load_from_string(data)
    info = CompiledInfo.from_model(model)
    if info is None or info.tuned:
        return data
    shapes = infer_shapes(model)
    masks = conv_masks(model, shapes)
    broadcasts = upsample_broadcasts(model, shapes, opset_version(model))
    eliminate_dead_code(model)  # the comparisons the masks replaced
    topological_sort(model)
    info.tuned = {"runtime": "onnxruntime", "conv_masks": masks, "upsample_broadcasts": broadcasts}
    _set_meta(model, info)
    return model.SerializeToString()
