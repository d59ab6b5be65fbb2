"""Streamed path methods (issue #9 §3): bit-identical to the stacked computation for any chunking,
and peak memory that does not grow with steps.

The references below are the stacked (unstreamed) algorithms, written here: every path point of
every image in one (P, N, *s) array and one ``gradient`` call, then summed in point order. The
model computes each row with per-row reductions only (no BLAS, whose kernels may differ with the
number of rows), so a row's gradient does not depend on the batch it came in and any difference
would come from the streaming itself.
"""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest

from engine.methods import METHODS, explain
from engine.methods.idgi import StreamingIDGI, idgi
from engine.methods.quadrature import QUADRATURES, alphas_and_weights
from engine.methods.stream import Piece, stream_gradients
from engine.perturb import gaussian_blur, make_baseline, spatial_axes
from tests.analytic import AnalyticClassifier, LinearSoftmax, images


class RowwiseTanhNet(AnalyticClassifier):
    """logits = W2·tanh(W1·vec(x) + b1) + b2 on NCHW images, every contraction an elementwise
    product summed over the last axis, row by row."""

    layout = "NCHW"

    def __init__(self, shape=(3, 8, 8), num_classes=5, hidden=6, *, seed=0, **kw):
        super().__init__(shape, num_classes, **kw)
        rng = np.random.default_rng(seed)
        d = int(np.prod(shape))
        self.W1 = rng.normal(0, 2.0 / np.sqrt(d), (hidden, d))
        self.b1 = rng.normal(0, 0.1, hidden)
        self.W2 = rng.normal(0, 1.0, (num_classes, hidden))
        self.b2 = rng.normal(0, 0.1, num_classes)

    def _forward(self, x):
        h = np.tanh((x.reshape(len(x), 1, -1) * self.W1).sum(-1) + self.b1)
        return (h[:, None, :] * self.W2).sum(-1) + self.b2, h

    def _backward(self, h, dlogits, rule):
        dz = (dlogits[:, None, :] * self.W2.T).sum(-1) * (1 - h * h)
        return (dz[:, None, :] * self.W1.T).sum(-1).reshape(len(h), *self.input_shape)


def stacked_gradients(model, points, target, output):
    p, n = points.shape[:2]
    scores, grads = model.gradient(points.reshape(p * n, *points.shape[2:]), np.tile(target, p), output)
    return np.asarray(scores, np.float64).reshape(p, n), np.asarray(grads).reshape(points.shape)


def stacked_ig(model, x, baseline, target, output, steps, quadrature, use_idgi):
    """IG / IDGI with every point in one stack; returns (attr float32, completeness delta)."""
    alphas, weights = alphas_and_weights(quadrature, steps)
    extra = [a for a in (0.0, 1.0) if not np.any(alphas == a)]
    alphas, weights = np.concatenate([alphas, extra]), np.concatenate([weights, np.zeros(len(extra))])
    order = np.argsort(alphas, kind="stable")
    alphas, weights = alphas[order], weights[order]
    b64 = baseline.astype(np.float64)
    diff = x.astype(np.float64) - b64
    points = np.empty((len(alphas), *x.shape), dtype=np.float32)
    for p, a in enumerate(alphas):
        points[p] = b64 + a * diff
    scores, grads = stacked_gradients(model, points, target, output)
    if use_idgi:
        attr = idgi(grads, scores)
    else:
        acc = np.zeros(x.shape, dtype=np.float64)
        for w, g in zip(weights, grads, strict=True):
            if w != 0:
                acc += w * g
        attr = diff * acc
    return attr.astype(np.float32), attr.reshape(len(x), -1).sum(axis=1) - (scores[-1] - scores[0])


def stacked_blur_ig(model, x, target, output, max_sigma, steps, grad_step, sqrt, use_idgi):
    axes = spatial_axes(model)
    f = math.sqrt if sqrt else float
    sigmas = [f(float(i) * max_sigma / float(steps)) for i in range(steps + 1)]
    points = np.stack([gaussian_blur(x, s, axes) for s in sigmas[:-1]])
    scores, grads = stacked_gradients(model, points, target, output)
    if use_idgi:
        return idgi(grads[::-1], scores[::-1]).astype(np.float32)
    acc = np.zeros(x.shape, dtype=np.float64)
    for i in range(steps):
        dx = np.subtract(gaussian_blur(x, sigmas[i] + grad_step, axes), points[i], dtype=np.float64)
        acc += (sigmas[i + 1] - sigmas[i]) * (dx / grad_step) * grads[i]
    return (-acc).astype(np.float32)


def stacked_smoothgrad(model, x, target, output, noise_level, samples, magnitude, seed, base, steps):
    """All N × samples noisy copies drawn at once and explained in one stack; base "saliency" or
    "integrated_gradients" with a "uniform" baseline drawn for all copies at once."""
    n, s = len(x), samples
    flat = x.reshape(n, -1)
    spread = flat.max(axis=1).astype(np.float64) - flat.min(axis=1)
    sigma = (noise_level * spread).reshape((n, 1) + (1,) * (x.ndim - 1))
    noise = np.random.default_rng(seed).standard_normal((n, s, *x.shape[1:])) * sigma
    noisy = (x[:, None].astype(np.float64) + noise).reshape(n * s, *x.shape[1:]).astype(np.float32)
    t = np.repeat(target, s)
    if base == "saliency":
        maps = model.gradient(noisy, t, output)[1]
    else:
        b = make_baseline(model, noisy, "uniform", seed=3)
        maps = stacked_ig(model, noisy, b, t, output, steps, "right", False)[0]
    maps = np.asarray(maps, dtype=np.float64).reshape(n, s, *x.shape[1:])
    return (maps * maps if magnitude else maps).mean(axis=1).astype(np.float32)


BATCH_SIZES = (1, 3, 7, 64, None)  # 3 and 7 split points mid-image (4 images per point)


@pytest.fixture(scope="module")
def setup():
    model = RowwiseTanhNet()
    x = images(model, 4, seed=2)
    target = np.array([0, 3, 1, 4])
    return model, x, target


@pytest.mark.parametrize("quadrature", QUADRATURES)
@pytest.mark.parametrize("use_idgi", [False, True])
def test_ig_is_bit_identical_to_the_stacked_computation(setup, quadrature, use_idgi):
    model, x, target = setup
    base = make_baseline(model, x, "uniform", seed=1)
    model.batch_size = None
    ref, ref_delta = stacked_ig(model, x, base, target, "probability", 9, quadrature, use_idgi)
    for batch_size in BATCH_SIZES:
        model.batch_size = batch_size
        model.reset_counts()
        got, delta = explain(
            model, x, "integrated_gradients", target=target, steps=9, quadrature=quadrature,
            idgi=use_idgi, baseline=base, return_delta=True,
        )  # fmt: skip
        assert np.array_equal(got, ref), (batch_size, np.abs(got - ref).max())
        assert np.array_equal(delta, ref_delta), batch_size
        if batch_size is not None:  # streamed: one call per chunk of batch_size rows
            chunks = -(-model.rows["gradient"] // batch_size)
            assert model.calls["gradient"] == model.chunks["gradient"] == chunks, batch_size
    assert np.abs(ref).max() > 0


@pytest.mark.parametrize("sqrt, use_idgi", [(False, False), (True, False), (False, True)])
def test_blur_ig_is_bit_identical_to_the_stacked_computation(setup, sqrt, use_idgi):
    model, x, target = setup
    model.batch_size = None
    ref = stacked_blur_ig(model, x, target, "logit", 3.0, 7, 0.01, sqrt, use_idgi)
    for batch_size in BATCH_SIZES:
        model.batch_size = batch_size
        got = explain(
            model, x, "blur_ig", target=target, output="logit", max_sigma=3.0, steps=7, sqrt=sqrt,
            idgi=use_idgi,
        )  # fmt: skip
        assert np.array_equal(got, ref), (batch_size, np.abs(got - ref).max())
    assert np.abs(ref).max() > 0


@pytest.mark.parametrize(
    "base, magnitude", [("saliency", False), ("saliency", True), ("integrated_gradients", False)]
)
def test_smoothgrad_is_bit_identical_to_the_stacked_computation(setup, base, magnitude):
    """10 samples: a sum of 10 terms would differ if the chunked sum used another order than the
    stacked mean (numpy's pairwise summation unrolls by 8)."""
    model, x, target = setup
    model.batch_size = None
    ref = stacked_smoothgrad(model, x, target, "probability", 0.2, 10, magnitude, 4, base, 5)
    params = {"baseline": "uniform", "steps": 5, "seed": 3} if base != "saliency" else {}
    for batch_size in BATCH_SIZES:
        model.batch_size = batch_size
        got = explain(
            model, x, "smoothgrad", target=target, base=base, base_params=params, noise_level=0.2,
            samples=10, magnitude=magnitude, seed=4,
        )  # fmt: skip
        assert np.array_equal(got, ref), (batch_size, np.abs(got - ref).max())
    assert np.abs(ref).max() > 0


def test_smoothgrad_gives_a_perturbation_base_all_copies_at_once(setup):
    """Occlusion with a seeded "uniform" fill draws per call: SmoothGrad calls it once on all
    copies, whatever the batch size, so the result is the stacked one."""
    model, x, target = setup
    params = {"window": 4, "stride": 4, "fill": "uniform", "seed": 2}
    n, s = len(x), 3
    spread = x.reshape(n, -1).max(axis=1).astype(np.float64) - x.reshape(n, -1).min(axis=1)
    noise = np.random.default_rng(0).standard_normal((n, s, *x.shape[1:])) * (0.15 * spread).reshape(
        n, 1, 1, 1, 1
    )
    noisy = (x[:, None].astype(np.float64) + noise).reshape(n * s, *x.shape[1:])
    model.batch_size = None
    maps = METHODS["occlusion"](model, noisy.astype(np.float32), np.repeat(target, s), **params)
    ref = np.asarray(maps, np.float64).reshape(n, s, *x.shape[1:]).mean(axis=1).astype(np.float32)
    for batch_size in (3, None):
        model.batch_size = batch_size
        got = explain(model, x, "smoothgrad", target=target, base="occlusion", base_params=params, samples=s)
        assert np.array_equal(got, ref), batch_size


@pytest.mark.parametrize(
    "params",
    [
        {"eps": 0.2},
        {"eps": 0.2, "idgi": True},
        {"eps": 0.2, "accumulate": False},
        {"eps": 0.2, "path": "straight", "idgi": True},
        {"double_softmax": True},
    ],
)
def test_agi_pair_groups_are_bit_identical(params):
    """AGI runs its (image, class) pairs in groups of batch_size // 2 (steepest) or batch_size
    (straight) pairs. The same maps, bit for bit, as all 4 × 10 pairs in one group (batch_size
    None: the stacked computation), whose total is the sum of the per-class maps over the slots
    (10 slots: an order other than slot by slot would show)."""
    model = RowwiseTanhNet(num_classes=12)
    x = images(model, 4, seed=2)
    model.batch_size = None
    ref, ref_per_class = explain(model, x, "agi", classes=10, max_steps=6, return_per_class=True, **params)
    model.reset_counts()
    one_group = explain(model, x, "agi", classes=10, max_steps=6, **params)
    calls = model.calls["gradient"]
    assert np.array_equal(one_group, ref)
    np.testing.assert_allclose(
        ref, ref_per_class.astype(np.float64).sum(axis=1), rtol=1e-6, atol=1e-6 * abs(ref).max()
    )
    for batch_size in (1, 3, 7, 16):
        model.batch_size = batch_size
        model.reset_counts()
        got, per_class = explain(model, x, "agi", classes=10, max_steps=6, return_per_class=True, **params)
        assert np.array_equal(got, ref), (batch_size, np.abs(got - ref).max())
        assert np.array_equal(per_class, ref_per_class), batch_size
        assert model.calls["gradient"] > calls  # the pairs really ran in several groups
    assert np.abs(ref).max() > 0


def test_streaming_idgi_equals_idgi_for_any_split():
    rng = np.random.default_rng(0)
    grads = rng.normal(size=(6, 5, 3, 4)).astype(np.float32)
    scores = rng.normal(size=(6, 5))
    ref = idgi(grads, scores)
    for cut in (1, 2, 3, 7, 30):
        acc = StreamingIDGI(grads.shape[1:])
        flat = [(p, i) for p in range(6) for i in range(5)]
        for k in range(0, len(flat), cut):  # pieces of consecutive rows within one point
            rows = flat[k : k + cut]
            for p in sorted({p for p, _ in rows}):
                idx = [i for q, i in rows if q == p]
                sl = slice(idx[0], idx[-1] + 1)
                acc.add(Piece(p, sl, scores[p, sl], grads[p, sl]))
        assert np.array_equal(acc.total, ref), cut


def test_stream_gradients_sends_rows_in_stacked_order():
    model = RowwiseTanhNet((2, 3), 4)
    points = [
        (p + np.arange(3)[:, None, None] / 10 + np.zeros((3, 2, 3))).astype(np.float32) for p in range(5)
    ]
    target = np.array([0, 1, 2])
    pieces = list(stream_gradients(model, iter(points), target, "logit", rows=4))
    assert [(q.point, q.images.start, q.images.stop) for q in pieces] == [
        (0, 0, 3), (1, 0, 1), (1, 1, 3), (2, 0, 2), (2, 2, 3), (3, 0, 3), (4, 0, 3)
    ]  # fmt: skip
    assert model.calls["gradient"] == 4 and model.rows["gradient"] == 15
    stacked = model.gradient(np.concatenate(points), np.tile(target, 5), "logit")
    np.testing.assert_array_equal(np.concatenate([q.gradients for q in pieces]), stacked[1])
    np.testing.assert_array_equal(np.concatenate([q.scores for q in pieces]), stacked[0])


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_ig_peak_memory_does_not_grow_with_steps():
    """IG on 2 images of 3×32×32 with 16-row chunks: 64 vs 1024 steps. Stacked, the points and
    gradients alone grow 16×; streamed, peak memory stays within 1.5× (the (steps, N) scores and the
    quadrature's alphas and weights are the only arrays that grow)."""
    model = LinearSoftmax((3, 32, 32), 4, batch_size=16, layout="NCHW")
    x = images(model, 2, seed=3)
    target = np.array([1, 2])
    base = np.zeros_like(x)

    def streamed(steps):
        return _peak(lambda: explain(model, x, "integrated_gradients", target=target, steps=steps))

    def stacked(steps):
        return _peak(lambda: stacked_ig(model, x, base, target, "probability", steps, "right", False))

    streamed(8)  # warm-up: first-call allocations (imports, caches) out of the measurement
    small, large = streamed(64), streamed(1024)
    assert large < 1.5 * small, (small, large)
    model.batch_size = None
    s_small, s_large = stacked(64), stacked(1024)
    assert s_large > 8 * s_small, (s_small, s_large)  # what the bound guards against


@pytest.mark.parametrize(
    "method, name, small, large",
    [("smoothgrad", "samples", 16, 256), ("blur_ig", "steps", 8, 128), ("agi", "classes", 4, 60)],
)
def test_peak_memory_does_not_grow_with_samples_steps_or_classes(method, name, small, large):
    """SmoothGrad samples, Blur IG steps and AGI classes 15-16× apart: peak memory within 1.5×."""
    model = LinearSoftmax((3, 32, 32), 64, batch_size=16, layout="NCHW")
    x = images(model, 2, seed=3)
    params = {"max_steps": 3} if method == "agi" else {"max_sigma": 3.0} if method == "blur_ig" else {}

    def peak(value):
        return _peak(lambda: explain(model, x, method, target=[1, 2], **{name: value}, **params))

    peak(2)  # warm-up
    a, b = peak(small), peak(large)
    assert b < 1.5 * a, (a, b)
