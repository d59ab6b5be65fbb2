"""Bring a model's opset into the range the builder reads and the lowerings need."""

from __future__ import annotations

import onnx
from onnx import version_converter

from ...errors import UnsupportedModelError
from ..domains import MAX_OPSET, MIN_OPSET, TARGET_MIN_OPSET
from ..graph import opset_version


def upgrade_opset(model: onnx.ModelProto, where: str) -> onnx.ModelProto:
    version = opset_version(model)
    if version < MIN_OPSET:
        raise UnsupportedModelError(
            f"{where}: opset {version} is older than {MIN_OPSET} (Softmax semantics changed at 13); "
            f"re-export the model with opset >= {MIN_OPSET}"
        )
    if version > MAX_OPSET:
        raise UnsupportedModelError(
            f"{where}: opset {version} is newer than {MAX_OPSET}, the last one onnxruntime-training "
            f"1.19.2 reads; re-export with opset <= {MAX_OPSET}"
        )
    if version < TARGET_MIN_OPSET:
        try:
            model = version_converter.convert_version(model, TARGET_MIN_OPSET)
        except Exception as e:
            raise UnsupportedModelError(
                f"{where}: could not raise opset {version} to {TARGET_MIN_OPSET} ({e}); "
                f"re-export with opset >= {TARGET_MIN_OPSET}"
            ) from e
    return model
