"""Parity with PAIR saliency 0.2.1 on the same analytic NHWC model (PAIR assumes HWC images).

PAIR's ``call_model_function`` wraps our analytic model; PAIR runs one image at a time, we run the
batch. Tolerance: max abs error <= 1e-5 of the map's scale (max |map|).
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.methods import explain

try:
    from analytic import ConvNet
except ImportError:  # tests/ is a package
    from tests.analytic import ConvNet

saliency_core = pytest.importorskip("saliency.core")


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


OUTPUT = "probability"


@pytest.fixture(scope="module")
def setup():
    model = ConvNet("NHWC", size=(10, 8), features=6, num_classes=6, seed=4)
    x = np.random.default_rng(7).uniform(0, 1, (2, *model.input_shape)).astype(np.float32)
    target = model.predict(x).argmax(1)

    def call_model_function(x_batch, call_model_args=None, expected_keys=None):
        t = call_model_args["target"]
        scores, grads = model.gradient(np.asarray(x_batch, np.float32), t, OUTPUT)
        return {
            saliency_core.INPUT_OUTPUT_GRADIENTS: grads,
            saliency_core.base.OUTPUT_LAYER_VALUES: scores,
        }

    def pair(method, **kw):
        return np.stack(
            [
                method.GetMask(x[i], call_model_function, {"target": int(target[i])}, **kw)
                for i in range(len(x))
            ]
        )

    return model, x, target, call_model_function, pair


def test_integrated_gradients(setup):
    model, x, target, _, pair = setup
    for steps, batch in [(25, 20), (7, 1)]:
        ref = pair(
            saliency_core.IntegratedGradients(),
            x_baseline=np.zeros_like(x[0]),
            x_steps=steps,
            batch_size=batch,
        )
        ours = explain(model, x, "integrated_gradients", target=target, steps=steps, quadrature="pair")
        assert rel_err(ours, ref) <= 1e-5


@pytest.mark.parametrize("sqrt", [False, True])
def test_blur_ig(setup, sqrt):
    model, x, target, _, pair = setup
    kw = dict(max_sigma=12, steps=30, grad_step=0.01, sqrt=sqrt)
    ref = pair(saliency_core.BlurIG(), batch_size=1, **kw)
    ours = explain(model, x, "blur_ig", target=target, **kw)
    assert rel_err(ours, ref) <= 1e-5


def test_blur_ig_defaults(setup):
    model, x, target, _, pair = setup
    ref = pair(saliency_core.BlurIG(), batch_size=1)
    assert rel_err(explain(model, x, "blur_ig", target=target), ref) <= 1e-5


@pytest.fixture
def quantile_shim(monkeypatch):
    """PAIR calls np.quantile(interpolation='lower'), removed in NumPy 2: translate it."""
    original = np.quantile

    def quantile(*args, interpolation=None, **kwargs):
        if interpolation is not None:
            kwargs["method"] = interpolation
        return original(*args, **kwargs)

    monkeypatch.setattr(np, "quantile", quantile)


@pytest.mark.parametrize(
    "kw",
    [
        dict(x_steps=200, fraction=0.25, max_dist=0.02),  # library defaults
        dict(x_steps=25, fraction=0.5, max_dist=1.0),  # notebook settings
        dict(x_steps=40, fraction=0.1, max_dist=0.1, baseline=0.5),
    ],
    ids=["defaults", "notebook", "grey-baseline"],
)
def test_guided_ig(setup, quantile_shim, kw):
    model, x, target, _, pair = setup
    kw = dict(kw)
    b = kw.pop("baseline", 0.0)
    ref = pair(saliency_core.GuidedIG(), x_baseline=np.full_like(x[0], b), **kw)
    ours = explain(
        model, x, "guided_ig", target=target, baseline=b, steps=kw["x_steps"],
        fraction=kw["fraction"], max_dist=kw["max_dist"],
    )  # fmt: skip
    assert rel_err(ours, ref) <= 1e-5


@pytest.fixture
def replay_normal(monkeypatch):
    """Make PAIR's np.random.normal draw the normals our default_rng(seed) noise uses: each HWC
    copy drawn channel-first (C, H, W), as onnxplain draws noise for every layout."""

    def install(seed):
        rng = np.random.default_rng(seed)

        def normal(loc=0.0, scale=1.0, size=None):
            h, w, c = size
            return np.moveaxis(rng.standard_normal((c, h, w)), 0, -1) * scale + loc

        monkeypatch.setattr(np.random, "normal", normal)

    return install


@pytest.mark.parametrize("magnitude", [True, False])
def test_smoothgrad_saliency(setup, replay_normal, magnitude):
    model, x, target, cmf, _ = setup
    replay_normal(123)
    ref = np.stack(
        [
            saliency_core.GradientSaliency().GetSmoothedMask(
                x[i],
                cmf,
                {"target": int(target[i])},
                stdev_spread=0.15,
                nsamples=10,
                magnitude=magnitude,
            )  # fmt: skip
            for i in range(len(x))
        ]
    )
    ours = explain(model, x, "smoothgrad", target=target, samples=10, seed=123, magnitude=magnitude)
    assert rel_err(ours, ref) <= 1e-5


def test_smoothgrad_integrated_gradients(setup, replay_normal):
    model, x, target, cmf, _ = setup
    replay_normal(9)
    ref = np.stack(
        [
            saliency_core.IntegratedGradients().GetSmoothedMask(
                x[i],
                cmf,
                {"target": int(target[i])},
                nsamples=4,
                x_baseline=np.zeros_like(x[i]),
                x_steps=6,
                batch_size=6,
            )  # fmt: skip
            for i in range(len(x))
        ]
    )
    ours = explain(
        model, x, "smoothgrad", target=target, samples=4, seed=9, base="integrated_gradients",
        base_params={"steps": 6, "quadrature": "pair"}, magnitude=True,
    )  # fmt: skip
    assert rel_err(ours, ref) <= 1e-5


def test_vanilla_gradient(setup):
    model, x, target, _, pair = setup
    ref = pair(saliency_core.GradientSaliency())
    assert rel_err(explain(model, x, "saliency", target=target), ref) <= 1e-6
