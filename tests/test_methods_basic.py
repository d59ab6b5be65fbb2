"""Single-gradient methods, Grad-CAM, the explain() API and sanity checks on analytic models."""

from __future__ import annotations

import numpy as np
import pytest

from engine.methods import METHODS, explain, method_parameters
from engine.methods.grad_cam import upsample_bilinear
from tests.analytic import SMALL_PARAMS, ConvNet, LinearSoftmax, ReluNet, TanhNet, head, images, rel_err

# -- the analytic models themselves ----------------------------------------------------------------


@pytest.mark.parametrize(
    "model",
    [
        LinearSoftmax((2, 3), 4, dtype=np.float64),
        TanhNet((5,), 3, dtype=np.float64),
        ReluNet((5,), 3, dtype=np.float64),
        ConvNet("NCHW", dtype=np.float64),
        ConvNet("NHWC", dtype=np.float64),
    ],
    ids=lambda m: f"{type(m).__name__}-{m.layout}",
)
@pytest.mark.parametrize("output", ["logit", "probability", "log_probability"])
def test_analytic_gradients_match_finite_differences(model, output):
    x = images(model, 2).astype(np.float64)
    t = np.array([0, 2])
    _, g = model.gradient(x, t, output)
    h = 1e-6
    flat = x.reshape(2, -1)
    fd = np.zeros_like(flat)
    for j in range(flat.shape[1]):
        e = np.zeros_like(flat)
        e[:, j] = h
        up = model.score((flat + e).reshape(x.shape), t, output)
        dn = model.score((flat - e).reshape(x.shape), t, output)
        fd[:, j] = (up - dn) / (2 * h)
    assert rel_err(g.reshape(2, -1), fd) < 1e-6


def test_nhwc_model_is_the_nchw_model_transposed():
    a, b = ConvNet("NCHW"), ConvNet("NHWC")
    x = images(a, 2)
    xt = x.transpose(0, 2, 3, 1)
    np.testing.assert_allclose(a.predict(x), b.predict(xt), rtol=1e-6)
    ga = a.gradient(x, 1, "probability")[1]
    gb = b.gradient(xt, 1, "probability")[1]
    np.testing.assert_allclose(ga.transpose(0, 2, 3, 1), gb, rtol=1e-5, atol=1e-7)


# -- formulas on hand-computed gradients -----------------------------------------------------------


@pytest.mark.parametrize("output", ["logit", "probability", "log_probability"])
def test_saliency_and_gradient_x_input_on_linear_softmax(output):
    m = LinearSoftmax((6,), 4)
    x = images(m, 3)
    t = np.array([0, 3, 1])
    logits = x.astype(np.float64) @ m.W.T + m.b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    wt = m.W[t]
    expected = {
        "logit": wt,
        "probability": p[np.arange(3), t][:, None] * (wt - p @ m.W),
        "log_probability": wt - p @ m.W,
    }[output]
    s = explain(m, x, "saliency", target=t, output=output)
    assert s.dtype == np.float32 and s.shape == x.shape
    assert rel_err(s, expected) < 1e-5
    assert rel_err(METHODS["saliency"](m, x, t, output=output, abs=True), np.abs(expected)) < 1e-5
    assert rel_err(explain(m, x, "gradient_x_input", target=t, output=output), x * expected) < 1e-5


def test_guided_backprop_and_deconvnet_closed_form():
    m = ReluNet((6,), 4, hidden=12)
    x = images(m, 4) * 2 - 1
    t = np.array([0, 1, 2, 3])
    pre = x.astype(np.float64) @ m.W1.T + m.b1
    dh = m.W2[t]  # logit output
    guided = (dh * (pre > 0) * (dh > 0)) @ m.W1
    deconv = (dh * (dh > 0)) @ m.W1
    plain = (dh * (pre > 0)) @ m.W1
    assert rel_err(explain(m, x, "guided_backprop", target=t, output="logit"), guided) < 1e-5
    assert rel_err(explain(m, x, "deconvnet", target=t, output="logit"), deconv) < 1e-5
    assert rel_err(explain(m, x, "saliency", target=t, output="logit"), plain) < 1e-5
    assert not np.allclose(guided, plain) and not np.allclose(deconv, plain)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("relu", [True, False])
def test_grad_cam_hand_computed(layout, relu):
    m = ConvNet(layout, size=(8, 6), features=5)
    x = images(m, 2)
    t = np.array([1, 4])
    cam = explain(m, x, "grad_cam", target=t, output="logit", relu=relu)
    assert cam.shape == x.shape and cam.dtype == np.float32
    # by hand, in NCHW: A = pooled tanh features, dA = W_t reshaped
    xc = x if layout == "NCHW" else x.transpose(0, 3, 1, 2)
    u = np.tanh(np.einsum("fc,nchw->nfhw", m.V, xc.astype(np.float64)) + m.c[:, None, None])
    a = u.reshape(2, 5, 4, 2, 3, 2).mean(axis=(3, 5))
    da = m.W[t].reshape(a.shape)
    low = (da.mean(axis=(2, 3), keepdims=True) * a).sum(axis=1)
    if relu:
        low = np.maximum(low, 0)
    up = upsample_bilinear(low, (8, 6))
    got = cam[:, 0] if layout == "NCHW" else cam[..., 0]
    assert rel_err(got, up) < 1e-5
    for c in range(3):  # broadcast over channels
        np.testing.assert_array_equal(got, cam[:, c] if layout == "NCHW" else cam[..., c])


def test_grad_cam_channels_first_tap_of_an_nhwc_model():
    m = ConvNet("NHWC")
    x = images(m, 2)
    expected = explain(m, x, "grad_cam", target=1)

    class ChannelsFirstTap(ConvNet):
        def layer_gradient(self, x, target, output="logit", layer=None):
            s, a, g = super().layer_gradient(x, target, output, layer)
            return s, a.transpose(0, 3, 1, 2), g.transpose(0, 3, 1, 2)

    m2 = ChannelsFirstTap("NHWC")
    np.testing.assert_array_equal(explain(m2, x, "grad_cam", target=1, layer_layout="NCHW"), expected)
    with pytest.raises(ValueError, match="layer_layout"):
        explain(m2, x, "grad_cam", target=1, layer_layout="CHW")


def test_upsample_bilinear_matches_torch_align_corners_false():
    torch = pytest.importorskip("torch")
    z = np.random.default_rng(0).normal(size=(2, 3, 5))
    for size in [(7, 11), (3, 5), (6, 10), (2, 3)]:
        ref = torch.nn.functional.interpolate(
            torch.from_numpy(z)[:, None], size=size, mode="bilinear", align_corners=False
        )[:, 0].numpy()
        np.testing.assert_allclose(upsample_bilinear(z, size), ref, rtol=1e-12, atol=1e-12)


# -- explain(): validation and targets -------------------------------------------------------------


def test_explain_validates_everything():
    m = LinearSoftmax((2, 3), 4)
    x = images(m, 2)
    with pytest.raises(ValueError, match="known: saliency"):
        explain(m, x, "nope")
    with pytest.raises(TypeError, match="stepz"):
        explain(m, x, "integrated_gradients", stepz=3)
    with pytest.raises(ValueError, match="batch"):
        explain(m, x[0], "saliency")
    with pytest.raises(ValueError, match="batch"):
        explain(m, x.reshape(2, 6), "saliency")
    bad = x.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        explain(m, bad, "saliency")
    with pytest.raises(ValueError, match="output"):
        explain(m, x, "saliency", output="softmax")
    with pytest.raises(ValueError, match="out of range"):
        explain(m, x, "saliency", target=4)
    with pytest.raises(ValueError, match="one class per image"):
        explain(m, x, "saliency", target=[1, 2, 3])
    with pytest.raises(ValueError, match="image model"):
        explain(m, x, "blur_ig")


def test_explain_loads_a_path_lazily(monkeypatch, tmp_path):
    import sys
    import types

    m = LinearSoftmax((2, 3), 4)
    seen = []
    fake = types.ModuleType("engine.model")
    fake.load = lambda path: seen.append(path) or m
    monkeypatch.setitem(sys.modules, "engine.model", fake)
    x = images(m, 2)
    out = explain(tmp_path / "model.onnx", x, "saliency")
    assert seen == [tmp_path / "model.onnx"]
    np.testing.assert_array_equal(out, explain(m, x, "saliency"))


def test_target_none_is_top1_and_int_broadcasts():
    m = TanhNet((5,), 4)
    x = images(m, 5)
    top = m.predict(x).argmax(1)
    np.testing.assert_array_equal(explain(m, x, "saliency"), explain(m, x, "saliency", target=top))
    np.testing.assert_array_equal(
        explain(m, x, "saliency", target=2), explain(m, x, "saliency", target=[2] * 5)
    )


def test_signatures_show_every_parameter():
    for name, fn in METHODS.items():
        params = method_parameters(name)
        assert params["output"] == "probability", name
        assert fn.__doc__, name
    assert method_parameters("integrated_gradients")["steps"] == 50
    assert method_parameters("smoothgrad")["samples"] == 25


# -- sanity: maps depend on the weights and on the target ------------------------------------------


@pytest.mark.parametrize("method", sorted(METHODS))
def test_maps_change_with_weights_and_target(method):
    assert set(SMALL_PARAMS) == set(METHODS)
    params = SMALL_PARAMS[method]
    m1 = ConvNet("NCHW", activation="relu", seed=0)
    m2 = ConvNet("NCHW", activation="relu", seed=7)  # randomised weights
    x = images(m1, 2)
    a = explain(m1, x, method, target=1, output="logit", **params)
    b = explain(m2, x, method, target=1, output="logit", **params)
    c = explain(m1, x, method, target=3, output="logit", **params)
    assert a.shape == x.shape and a.dtype == np.float32 and np.isfinite(a).all()
    assert np.abs(a).max() > 0
    assert not np.allclose(a, b, rtol=1e-3, atol=1e-6)
    assert not np.allclose(a, c, rtol=1e-3, atol=1e-6)


def test_head_helper_matches_engine_output_scores():
    from engine.methods.common import output_scores

    z = np.random.default_rng(0).normal(size=(4, 6))
    t = np.array([0, 5, 2, 2])
    for out in ["logit", "probability", "log_probability"]:
        np.testing.assert_allclose(output_scores(z, t, out), head(z, t, out)[0], rtol=1e-12)


def test_paper_defaults_where_code_and_paper_disagree():
    """The paper's algorithm is the default; the reference code's behaviour is an option."""
    assert method_parameters("smoothgrad")["magnitude"] is False  # SmoothGrad paper: plain mean
    assert method_parameters("integrated_gradients")["quadrature"] == "right"  # IG paper: Riemann sum
    assert method_parameters("agi")["accumulate"] is True  # AGI paper: steepest-ascent path
