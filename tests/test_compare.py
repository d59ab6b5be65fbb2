"""`onnxplain compare` on real pairs: the PyTorch/Keras twins (must agree to float rounding) and the
classic porting mistake (Keras' BatchNormalization epsilon 1e-3 instead of 1e-5: must show).

References: the frameworks themselves — torch's and Keras' logits for the model agreement, torch
autograd and tf.GradientTape for the maps, scipy's Spearman and pytorch_msssim's SSIM for the
agreement measures.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from engine.cli import main
from engine.compare import explanation_agreement


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    pytest.importorskip("tensorflow")
    from exporters import keras as keras_export
    from exporters import torch as torch_export
    from models import twins

    root = tmp_path_factory.mktemp("compare")
    net = twins.build_torch_twin(seed=3)
    good = twins.build_keras_twin(net)
    bad = twins.build_keras_twin(net, bn_epsilon=1e-3)
    torch_export.export(net, root / "torch.onnx", input_shape=twins.INPUT_SHAPE_NCHW)
    keras_export.export(good, root / "keras.onnx")
    keras_export.export(bad, root / "keras_eps.onnx")
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), np.uint8)).save(photos / f"p{i}.png")
    return root, net, good, bad


def _torch_saliency(net, x, target):
    import torch

    xt = torch.tensor(x, requires_grad=True)
    z = torch.softmax(net(xt), dim=1)
    z[torch.arange(len(x)), torch.as_tensor(target)].sum().backward()
    return z.detach().numpy(), xt.grad.numpy()


def _keras_saliency(model, x_nhwc, target):
    import tensorflow as tf

    xt = tf.constant(x_nhwc)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        p = tf.nn.softmax(model(xt, training=False), axis=1)
        score = tf.reduce_sum(tf.gather(p, target, axis=1, batch_dims=1))
    return p.numpy(), tape.gradient(score, xt).numpy()


def test_the_twins_agree_to_float_rounding_and_the_epsilon_bug_shows(pair, capsys):
    root, net, good, bad = pair
    results = {}
    for name in ("keras", "keras_eps"):
        out = root / f"out_{name}"
        assert (
            main(
                [
                    "compare",
                    str(root / "torch.onnx"),
                    str(root / f"{name}.onnx"),
                    str(root / "photos"),
                    "-m",
                    "saliency",
                    "--param",
                    "abs=false",
                    "-o",
                    str(out),
                    "--quiet",
                ]
            )
            == 0
        )
        results[name] = json.loads((out / "compare.json").read_text())
        assert (out / "report.html").read_text().count("data:image/png;base64,") == 6
    capsys.readouterr()
    from engine.images import read_images

    xa, _ = read_images(sorted((root / "photos").iterdir()), (3, 32, 32), "NCHW")
    xb = xa.transpose(0, 2, 3, 1)
    for name, model in (("keras", good), ("keras_eps", bad)):
        got = results[name]
        pa, ga = _torch_saliency(net, xa, got["models_agree"]["top1_a"])
        import torch

        za = net(torch.tensor(xa)).detach().numpy()
        zb = model(xb, training=False).numpy()
        expected = np.abs(za - zb).max()
        assert got["models_agree"]["max_abs_logit_diff"] == pytest.approx(expected, rel=0.05, abs=2e-6)
        _, gb = _keras_saliency(model, xb, np.array(got["models_agree"]["top1_a"]))
        rows = got["methods"]["saliency"]["per_image"]
        from scipy.stats import spearmanr

        for i, row in enumerate(rows):
            ha, hb = np.abs(ga[i]).sum(0), np.abs(gb[i]).sum(-1)
            assert row["spearman"] == pytest.approx(spearmanr(ha.ravel(), hb.ravel()).statistic, abs=2e-3)
    twins, buggy = results["keras"], results["keras_eps"]
    assert (
        twins["models_agree"]["relative_logit_diff"] < 1e-5 and twins["models_agree"]["top1_agreement"] == 1
    )
    assert buggy["models_agree"]["max_abs_logit_diff"] > 100 * twins["models_agree"]["max_abs_logit_diff"]
    t, b = twins["methods"]["saliency"]["aggregate"], buggy["methods"]["saliency"]["aggregate"]
    assert t["spearman"]["min"] > 0.9999 and t["ssim"]["min"] > 0.9999
    assert t["max_abs_diff_relative"]["mean"] < 1e-4
    assert b["max_abs_diff_relative"]["mean"] > 100 * t["max_abs_diff_relative"]["mean"]


def test_agreement_measures_against_references():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2, 3, 16, 16))
    b = a + rng.normal(scale=0.5, size=a.shape)
    rows = explanation_agreement(a, b, "NCHW", top_fraction=0.1)
    import torch
    from pytorch_msssim import ssim as torch_ssim
    from scipy.stats import spearmanr

    for i, row in enumerate(rows):
        ha, hb = np.abs(a[i]).sum(0), np.abs(b[i]).sum(0)
        assert row["spearman"] == pytest.approx(spearmanr(ha.ravel(), hb.ravel()).statistic, rel=1e-12)
        top = lambda h: set(np.argsort(-h.ravel(), kind="stable")[:26].tolist())  # noqa: E731, 10 % of 256
        assert row["top_k_intersection"] == len(top(ha) & top(hb)) / 26
        scale = lambda h: (h - h.min()) / (h.max() - h.min())  # noqa: E731
        ref = torch_ssim(
            torch.tensor(scale(ha))[None, None],
            torch.tensor(scale(hb))[None, None],
            data_range=1.0,
            size_average=False,
        ).item()
        assert row["ssim"] == pytest.approx(ref, rel=1e-6)
        assert row["max_abs_diff_relative"] == pytest.approx(np.abs(ha - hb).max() / max(ha.max(), hb.max()))
    same = explanation_agreement(a, a, "NCHW")
    assert all(r["spearman"] == pytest.approx(1) and r["ssim"] == pytest.approx(1) for r in same)
