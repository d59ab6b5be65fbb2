"""Path methods on analytic models: quadrature, IG, IDGI, Blur IG, Guided IG, SmoothGrad;
completeness, batching (call counts, batch budgets) and seeds."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from engine.methods import METHODS, explain
from engine.methods.idgi import idgi, idgi_step
from engine.methods.quadrature import QUADRATURES, alphas_and_weights
from tests.analytic import SMALL_PARAMS, ConvNet, LinearSoftmax, TanhNet, images, rel_err

# -- quadrature -----------------------------------------------------------------------------------


@pytest.mark.parametrize("quadrature", QUADRATURES)
def test_quadrature_rules(quadrature):
    a, w = alphas_and_weights(quadrature, 8)
    assert a.shape == w.shape == (8,) and np.all(np.diff(a) > 0) and a.min() >= 0 and a.max() <= 1
    total = {"pair": 1.0, "captum_trapezoid": 7 / 8}.get(quadrature, 1.0)
    assert np.isclose(w.sum(), total)
    exact_degree = {"gausslegendre": 15, "trapezoid": 1, "midpoint": 1}.get(quadrature)
    if exact_degree is not None:
        for d in range(exact_degree + 1):
            assert np.isclose((w * a**d).sum(), 1 / (d + 1), rtol=1e-12)


@pytest.mark.parametrize(
    "ours, theirs",
    [
        ("left", "riemann_left"),
        ("right", "riemann_right"),
        ("midpoint", "riemann_middle"),
        ("captum_trapezoid", "riemann_trapezoid"),
        ("gausslegendre", "gausslegendre"),
    ],
)
def test_quadrature_matches_captum(ours, theirs):
    am = pytest.importorskip("captum.attr._utils.approximation_methods")
    step_sizes, alphas = am.approximation_parameters(theirs)
    a, w = alphas_and_weights(ours, 13)
    np.testing.assert_allclose(a, alphas(13), atol=1e-7)  # captum: torch float32 linspace
    np.testing.assert_allclose(w, step_sizes(13), atol=1e-12)


def test_quadrature_rejects_bad_input():
    with pytest.raises(ValueError, match="known"):
        alphas_and_weights("simpson", 4)
    with pytest.raises(ValueError):
        alphas_and_weights("trapezoid", 1)
    with pytest.raises(ValueError):
        alphas_and_weights("left", 0)


# -- integrated gradients --------------------------------------------------------------------------


@pytest.mark.parametrize("quadrature", ["left", "right", "midpoint", "trapezoid", "gausslegendre"])
def test_ig_on_a_linear_logit_is_exact(quadrature):
    m = LinearSoftmax((2, 3), 4, input_range=(-1.0, 2.0))
    x = images(m, 3)
    t = np.array([0, 1, 3])
    attr = explain(m, x, "integrated_gradients", target=t, output="logit", steps=5, quadrature=quadrature)
    expected = (x + 1.0) * m.W[t].reshape(3, 2, 3)  # black baseline = input_range low = -1
    assert rel_err(attr, expected) < 1e-6


def test_ig_completeness_improves_with_steps_and_idgi_is_exact():
    m = TanhNet((6,), 4)
    x = images(m, 4) * 3
    t = np.array([0, 1, 2, 3])
    total = m.score(x, t, "probability") - m.score(np.zeros_like(x), t, "probability")
    gaps = []
    for steps in (4, 16, 64):
        attr, delta = explain(m, x, "integrated_gradients", target=t, steps=steps, return_delta=True)
        np.testing.assert_allclose(delta, attr.sum(1) - total, atol=1e-6)
        gaps.append(np.abs(delta).max())
    assert gaps[0] > gaps[1] > gaps[2]
    for quadrature in ("right", "gausslegendre", "pair"):
        attr, delta = explain(
            m,
            x,
            "integrated_gradients",
            target=t,
            steps=5,
            quadrature=quadrature,
            idgi=True,
            return_delta=True,
        )
        assert np.abs(delta).max() < 1e-6 * np.abs(total).max()
        np.testing.assert_allclose(attr.sum(1), total, rtol=1e-5, atol=1e-7)


def test_ig_idgi_formula_by_hand():
    m = TanhNet((4,), 3)
    x = images(m, 2)
    t = np.array([2, 0])
    n = 6
    got = explain(m, x, "integrated_gradients", target=t, steps=n, quadrature="pair", idgi=True)
    expected = np.zeros((2, 4))
    for i in range(2):
        pts = [x[i] * a for a in np.linspace(0, 1, n)]
        for k in range(n - 1):
            g = m.gradient(pts[k][None], t[i], "probability")[1][0].astype(np.float64)
            d = m.score(pts[k + 1][None], t[i], "probability") - m.score(pts[k][None], t[i], "probability")
            expected[i] += g * g * d / (g * g).sum()
    assert rel_err(got, expected) < 1e-5


def test_ig_baselines():
    m = ConvNet("NHWC", input_range=(0.0, 2.0))
    x = images(m, 2)
    t = 1
    kw = dict(target=t, output="logit", steps=4, return_delta=True)

    def total(b):
        return m.score(x, t, "logit") - m.score(b, t, "logit")

    blurred = np.stack([ndimage.gaussian_filter(xi, sigma=[3.0, 3.0, 0], mode="constant") for xi in x])
    for baseline, b in [
        ("black", np.zeros_like(x)),
        ("white", np.full_like(x, 2.0)),
        (0.5, np.full_like(x, 0.5)),
        (np.full(x.shape[1:], 0.25, np.float32), np.full_like(x, 0.25)),
        ("blur", blurred),
    ]:
        attr, delta = explain(m, x, "integrated_gradients", baseline=baseline, blur_sigma=3.0, **kw)
        np.testing.assert_allclose(attr.sum((1, 2, 3)) - delta, total(b), rtol=1e-5, atol=1e-6)
    u1 = explain(m, x, "integrated_gradients", baseline="uniform", seed=3, **kw)[0]
    u2 = explain(m, x, "integrated_gradients", baseline="uniform", seed=3, **kw)[0]
    u3 = explain(m, x, "integrated_gradients", baseline="uniform", seed=4, **kw)[0]
    np.testing.assert_array_equal(u1, u2)
    assert not np.array_equal(u1, u3)
    with pytest.raises(ValueError, match="baseline"):
        explain(m, x, "integrated_gradients", baseline="grey")
    with pytest.raises(ValueError, match="baseline shape"):
        explain(m, x, "integrated_gradients", baseline=np.zeros((3, 3)))


# -- IDGI ------------------------------------------------------------------------------------------


def test_idgi_telescopes_and_skips_zero_gradients():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(5, 2, 3))
    f = rng.normal(size=(6, 2))
    out = idgi(g, f)
    np.testing.assert_allclose(out.sum(1), f[-1] - f[0], rtol=1e-12)
    np.testing.assert_allclose(idgi(np.concatenate([g, g[:1]]), f), out)  # last gradient unused
    g[2, 1] = 0.0
    out = idgi(g, f)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[1].sum(), f[-1, 1] - f[0, 1] - (f[3, 1] - f[2, 1]), rtol=1e-12)
    np.testing.assert_array_equal(idgi_step(np.zeros((1, 3)), np.ones(1)), np.zeros((1, 3)))
    with pytest.raises(ValueError):
        idgi(g, f[:3])


# -- Blur IG ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("sqrt", [False, True])
def test_blur_ig_by_hand_per_image(layout, sqrt):
    m = ConvNet(layout)
    x = images(m, 2)
    t = np.array([0, 2])
    steps, max_sigma, h = 6, 3.0, 0.01
    got = explain(m, x, "blur_ig", target=t, steps=steps, max_sigma=max_sigma, sqrt=sqrt)
    sig = [0, 3.0, 3.0] if layout == "NCHW" else [3.0, 3.0, 0]
    expected = np.zeros(x.shape)
    for i in range(2):
        s = np.arange(steps + 1) * max_sigma / steps
        s = np.sqrt(s) if sqrt else s

        def blur(v, sigma):
            if sigma == 0:
                return v
            return ndimage.gaussian_filter(v, [sigma * (a > 0) for a in sig], mode="constant")

        for k in range(steps):
            xk = blur(x[i], s[k])
            dx = (blur(x[i], s[k] + h) - xk) / h
            g = m.gradient(xk[None], t[i], "probability")[1][0]
            expected[i] -= (s[k + 1] - s[k]) * dx * g
    assert rel_err(got, expected) < 1e-5


def test_blur_ig_completeness_and_idgi():
    m = ConvNet("NCHW")
    x = images(m, 2)
    t = np.array([1, 3])
    sig_last = 8.0 * 199 / 200
    blurred = ndimage.gaussian_filter(x, [0, 0, sig_last, sig_last], mode="constant")
    total = m.score(x, t, "logit") - m.score(blurred, t, "logit")
    attr = explain(m, x, "blur_ig", target=t, output="logit", max_sigma=8, steps=200)
    np.testing.assert_allclose(attr.sum((1, 2, 3)), total, rtol=0.05)
    steps = 20
    attr = explain(m, x, "blur_ig", target=t, output="logit", max_sigma=8, steps=steps, idgi=True)
    sig_last = 8.0 * (steps - 1) / steps
    blurred = ndimage.gaussian_filter(x, [0, 0, sig_last, sig_last], mode="constant")
    total = m.score(x, t, "logit") - m.score(blurred, t, "logit")
    np.testing.assert_allclose(attr.sum((1, 2, 3)), total, rtol=1e-5)


# -- Guided IG -------------------------------------------------------------------------------------


def test_guided_ig_on_a_linear_logit_is_exact():
    m = LinearSoftmax((3, 4), 4)
    x = images(m, 2)
    t = np.array([3, 1])
    attr = explain(m, x, "guided_ig", target=t, output="logit", steps=10, max_dist=0.3)
    assert rel_err(attr, x * m.W[t].reshape(x.shape)) < 1e-6


def test_guided_ig_with_max_dist_zero_is_left_riemann_ig():
    m = TanhNet((3, 4), 4)
    x = images(m, 2) * 2
    kw = dict(target=[1, 2], steps=12)
    a = explain(m, x, "guided_ig", max_dist=0.0, **kw)
    b = explain(m, x, "integrated_gradients", quadrature="left", **kw)
    assert rel_err(a, b) < 1e-5


def test_guided_ig_completeness_idgi_and_zero_input():
    m = TanhNet((10,), 4)
    x = images(m, 3) * 2
    x[2] = 0.0  # equals the black baseline: zero attribution
    t = np.array([0, 1, 2])
    total = m.score(x, t, "probability") - m.score(np.zeros_like(x), t, "probability")
    attr = explain(m, x, "guided_ig", target=t, steps=100, max_dist=0.1, fraction=0.3)
    np.testing.assert_allclose(attr.sum(1)[:2], total[:2], rtol=0.05)
    np.testing.assert_array_equal(attr[2], 0)
    m.reset_counts()
    attr = explain(m, x, "guided_ig", target=t, steps=10, max_dist=0.1, idgi=True)
    np.testing.assert_allclose(attr.sum(1), total, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(attr[2], 0)
    assert m.calls["gradient"] == 10 and m.calls["predict"] == 1  # a step each + the end score


@pytest.mark.parametrize("idgi_on", [False, True])
def test_guided_ig_threads_do_not_change_the_bits(monkeypatch, idgi_on):
    """The per-image sub-steps run in a thread pool sized by the CPU count; one thread (no pool)
    must give the same bits."""
    m = ConvNet("NCHW", num_classes=5)
    x = images(m, 4)
    kw = dict(target=[0, 1, 2, 3], steps=15, max_dist=0.05, fraction=0.2, idgi=idgi_on)
    pooled = explain(m, x, "guided_ig", **kw)
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    np.testing.assert_array_equal(explain(m, x, "guided_ig", **kw), pooled)


# -- SmoothGrad ------------------------------------------------------------------------------------


def test_smoothgrad_by_hand():
    m = TanhNet((2, 3), 4)
    x = images(m, 2)
    t = np.array([1, 2])
    s = 5
    for magnitude in (True, False):
        for noise_range, spread in [
            ("image", x.reshape(2, -1).max(1) - x.reshape(2, -1).min(1)),
            ("input_range", np.ones(2)),
        ]:
            got = explain(
                m, x, "smoothgrad", target=t, samples=s, seed=11, magnitude=magnitude,
                noise_level=0.2, noise_range=noise_range,
            )  # fmt: skip
            z = np.random.default_rng(11).standard_normal((2, s, 2, 3))
            expected = np.zeros(x.shape)
            for i in range(2):
                for j in range(s):
                    xn = x[i] + 0.2 * spread[i] * z[i, j]
                    g = m.gradient(xn[None].astype(np.float32), t[i], "probability")[1][0]
                    expected[i] += (g.astype(np.float64) ** 2 if magnitude else g) / s
            assert rel_err(got, expected) < 1e-5


def test_smoothgrad_wraps_any_method_in_one_call():
    m = ConvNet("NCHW")
    x = images(m, 3)
    m.reset_counts()
    explain(m, x, "smoothgrad", samples=6)
    assert m.calls["gradient"] == 1 and m.rows["gradient"] == 18
    m.reset_counts()
    out = explain(
        m, x, "smoothgrad", samples=6, target=1, base="integrated_gradients",
        base_params={"steps": 5}, magnitude=False,
    )  # fmt: skip
    assert m.calls == {"gradient": 1} and m.rows["gradient"] == 3 * 6 * 5
    assert out.shape == x.shape
    m.reset_counts()
    explain(m, x, "smoothgrad", samples=4, target=1, base="blur_ig", base_params={"steps": 5})
    assert m.calls == {"gradient": 1}
    with pytest.raises(ValueError, match="base_params"):
        explain(m, x, "smoothgrad", base="integrated_gradients", base_params={"target": 1})
    with pytest.raises(ValueError, match="unknown base"):
        explain(m, x, "smoothgrad", base="nope")


# -- batching and seeds across all methods -----------------------------------------------------------


@pytest.mark.parametrize("method", sorted(METHODS))
def test_batch_budget_does_not_change_results(method):
    results = []
    for budget in (1, 7, None):
        m = ConvNet("NHWC", activation="relu", batch_size=budget)
        results.append(explain(m, images(m, 4), method, **SMALL_PARAMS[method]))
        if budget == 7 and method not in ("grad_cam",):
            assert m.chunks["gradient"] >= m.calls["gradient"]
    np.testing.assert_allclose(results[0], results[2], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(results[1], results[2], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("method", ["smoothgrad", "agi", "integrated_gradients"])
def test_same_seed_same_bits(method):
    m = ConvNet("NCHW", num_classes=8)
    x = images(m, 3)
    params = dict(SMALL_PARAMS[method])
    if method == "integrated_gradients":
        params["baseline"] = "uniform"
    a = explain(m, x, method, seed=5, **params)
    b = explain(m, x, method, seed=5, **params)
    c = explain(m, x, method, seed=6, **params)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_call_counts_prove_batching():
    m = ConvNet("NCHW", batch_size=None)
    x = images(m, 4)
    m.reset_counts()
    explain(m, x, "integrated_gradients", target=0, steps=32)
    assert m.calls == {"gradient": 1} and m.rows["gradient"] == 4 * 32
    m.batch_size = 7
    m.reset_counts()
    explain(m, x, "integrated_gradients", target=0, steps=32)
    # streamed: one call per chunk of batch_size rows, each one runtime chunk
    assert m.calls["gradient"] == m.chunks["gradient"] == -(-128 // 7) and m.rows["gradient"] == 128
    m.batch_size = None
    m.reset_counts()
    explain(m, x, "integrated_gradients", steps=32, return_delta=True)  # + alpha=0 row per image
    assert m.calls == {"predict": 1, "gradient": 1} and m.rows["gradient"] == 4 * 33
    m.reset_counts()
    explain(m, x, "blur_ig", target=0, steps=20)
    assert m.calls == {"gradient": 1} and m.rows["gradient"] == 80
    m.reset_counts()
    explain(m, x, "guided_ig", target=0, steps=20)
    assert m.calls == {"gradient": 20} and m.rows["gradient"] == 80
    for name in ("saliency", "gradient_x_input", "guided_backprop", "deconvnet"):
        m.reset_counts()
        explain(m, x, name, target=0)
        assert m.calls == {"gradient": 1} and m.rows["gradient"] == 4
    m.reset_counts()
    explain(m, x, "grad_cam", target=0)
    assert m.calls == {"layer_gradient": 1}
