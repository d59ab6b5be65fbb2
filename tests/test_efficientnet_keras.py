"""The pretrained EfficientNet-Lite0 ported to Keras (models/efficientnet_keras.py) against the
PyTorch module it was ported from.

Reference: the torch module itself (``efficientnet_lite_pytorch`` with the pretrained weights) on
NCHW inputs, the port on the same inputs transposed to NHWC; then the two ONNX exports through
``engine.load(...).predict``. Tolerances are relative to the logit scale. Predict only: no
gradient model is compiled here (minutes on 2 cores).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

pytestmark = pytest.mark.slow

RTOL = 1e-4  # of the logit scale: float32 rounding through ~80 layers is ~1e-6 of it


def _scale(z: np.ndarray) -> float:
    return max(1.0, float(np.abs(z).max()))


def _torch_logits(module, x_nchw: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return module(torch.from_numpy(x_nchw)).numpy()


@pytest.fixture(scope="module")
def torch_module():
    pytest.importorskip("tensorflow")
    from models.efficientnet import load_efficientnet_lite0

    return load_efficientnet_lite0()


@pytest.fixture(scope="module")
def ports(torch_module):
    from models.efficientnet_keras import MISTAKE_BN_EPSILON, build_keras_efficientnet_lite0

    exact = build_keras_efficientnet_lite0(torch_module)
    mistake = build_keras_efficientnet_lite0(torch_module, bn_epsilon=MISTAKE_BN_EPSILON)
    return exact, mistake


def test_the_port_computes_the_torch_logits_and_the_epsilon_mistake_does_not(torch_module, ports):
    import keras
    from torch import nn

    from models.efficientnet_keras import MISTAKE_BN_EPSILON

    exact, mistake = ports
    torch_eps = {m.eps for m in torch_module.modules() if isinstance(m, nn.BatchNorm2d)}
    # efficientnet_lite_pytorch uses TensorFlow's 1e-3, so the mistake is PyTorch's default.
    assert torch_eps == {1e-3} and MISTAKE_BN_EPSILON == 1e-5
    for model, eps in ((exact, 1e-3), (mistake, MISTAKE_BN_EPSILON)):
        bns = [la for la in model.layers if isinstance(la, keras.layers.BatchNormalization)]
        assert len(bns) == sum(isinstance(m, nn.BatchNorm2d) for m in torch_module.modules())
        assert {la.epsilon for la in bns} == {eps}
    # Every parameter and BatchNorm statistic has been carried over (and nothing else exists).
    state = torch_module.state_dict()
    assert exact.count_params() == sum(v.numel() for k, v in state.items() if "num_batches" not in k)

    # Two random images normalised as the model expects: [-1, 1].
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 224, 224)).astype(np.float32)
    expected = _torch_logits(torch_module, x)
    x_nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    got = exact(x_nhwc, training=False).numpy()
    scale = _scale(expected)
    exact_diff = float(np.abs(got - expected).max())
    assert exact_diff <= RTOL * scale, (exact_diff, scale)
    assert (got.argmax(1) == expected.argmax(1)).all()

    wrong = mistake(x_nhwc, training=False).numpy()
    mistake_diff = float(np.abs(wrong - expected).max())
    # Measured: ~1e-6 of the scale for the port, ~1e-1 for the mistake.
    assert mistake_diff > 100 * RTOL * scale and mistake_diff > 1000 * exact_diff, (mistake_diff, exact_diff)


def test_the_exported_pair_agrees_through_the_engine_on_the_bundled_photos(torch_module, tmp_path):
    import engine
    from engine import metadata
    from models.efficientnet import export_efficientnet_lite0
    from models.efficientnet_keras import export_keras_efficientnet_lite0
    from models.images import sample_images

    torch_report = export_efficientnet_lite0(tmp_path / "torch.onnx")
    keras_report = export_keras_efficientnet_lite0(tmp_path / "keras.onnx", torch_module=torch_module)
    a, b = engine.load(torch_report.path), engine.load(keras_report.path)
    assert (a.layout, b.layout) == ("NCHW", "NHWC")
    assert a.labels == b.labels and len(b.labels) == 1000
    import onnx

    info_a = metadata.read(onnx.load(torch_report.path))
    info_b = metadata.read(onnx.load(keras_report.path))
    assert info_a.preprocessing == info_b.preprocessing  # the same task: [0, 1] images in

    photos, names = sample_images(224, layout="NCHW")
    za = a.predict(photos)
    zb = b.predict(np.ascontiguousarray(photos.transpose(0, 2, 3, 1)))
    # The torch module on the normalised photos is the reference for both files.
    expected = _torch_logits(torch_module, ((photos - 0.5) / 0.5).astype(np.float32))
    scale = _scale(expected)
    assert np.abs(za - expected).max() <= RTOL * scale
    assert np.abs(zb - za).max() <= RTOL * scale, (np.abs(zb - za).max(), scale)
    assert za.argmax(1).tolist() == zb.argmax(1).tolist() == expected.argmax(1).tolist()
    top1 = dict(zip(names, za.argmax(1).tolist(), strict=True))
    assert 281 <= top1["chelsea"] <= 285 and top1["coffee"] in (967, 968, 504), top1


@pytest.mark.parametrize("bad", [0.0, -1e-3, math.nan, math.inf, True, "1e-3"])
def test_bad_epsilon_is_refused_before_any_work(bad):
    pytest.importorskip("tensorflow")
    from engine.errors import ParameterError
    from models.efficientnet_keras import build_keras_efficientnet_lite0

    with pytest.raises(ParameterError, match="bn_epsilon"):
        build_keras_efficientnet_lite0(object(), bn_epsilon=bad)


@pytest.mark.parametrize(
    ("name", "override", "fault"),
    [
        # A 225-pixel input changes the static "same" paddings, not the weights.
        ("efficientnet-lite0", {"image_size": 225}, "pads"),
        # Lite1: more blocks per stage, so shapes stop fitting at block 3.
        ("efficientnet-lite1", {}, "do not fit"),
    ],
)
def test_a_different_torch_network_is_refused(name, override, fault):
    pytest.importorskip("tensorflow")
    from efficientnet_lite_pytorch import EfficientNet

    from engine.errors import InputError
    from models.efficientnet_keras import build_keras_efficientnet_lite0

    with pytest.raises(InputError, match=fault):
        build_keras_efficientnet_lite0(EfficientNet.from_name(name, **override).eval())
