"""AGI against an independent per-(image, class) implementation written from spec §8."""

from __future__ import annotations

import numpy as np
import pytest

from engine.methods import explain
from engine.methods.agi import select_classes

try:
    from analytic import ConvNet, LinearSoftmax, TanhNet
except ImportError:  # tests/ is a package
    from tests.analytic import ConvNet, LinearSoftmax, TanhNet


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def double_softmax_gradient(model, v, c):
    """∂ softmax(softmax(z))_c / ∂x by the chain rule with explicit Jacobians: the K logit
    gradients J_z (K, d), then J_q · J_p · J_z with J = diag(s) − s sᵀ for each softmax."""
    k = model.num_classes
    rows = np.repeat(v[None].astype(np.float32), k, axis=0)
    _, jz = model.gradient(rows, np.arange(k), "logit")
    p = softmax(model.predict(v[None].astype(np.float32))[0].astype(float))
    q = softmax(p)
    jp, jq = np.diag(p) - np.outer(p, p), np.diag(q) - np.outer(q, q)
    return (jq @ jp @ jz.reshape(k, -1).astype(float))[c].reshape(v.shape)


def reference_agi(model, x0, init, adv_classes, eps, max_iter, accumulate, output, idgi=False, double=False):
    """Spec §8 loop, one image and one class at a time (single-row model calls).
    Returns the per-class maps (k, *s) and the number of iterations each class used.
    ``double``: AGI_quantitive.py's gradients of softmax(softmax(logits))."""
    maps, used = [], []
    lo, hi = model.input_range
    x0 = x0.astype(np.float64)

    def f(v, c):
        return model.score(v[None], c, output)[0]

    for a in adv_classes:
        xp, acc, it = x0.copy(), np.zeros_like(x0), 0
        for it in range(max_iter):  # noqa: B007
            if np.argmax(model.predict(xp[None].astype(np.float32))[0]) == a:
                break  # early stop BEFORE using this point
            if double:
                g_adv = double_softmax_gradient(model, xp, a)
                g_lab = double_softmax_gradient(model, xp, init)
            else:
                g_adv = model.gradient(xp[None].astype(np.float32), a, output)[1][0].astype(float)
                g_lab = model.gradient(xp[None].astype(np.float32), init, output)[1][0].astype(float)
            start = xp if accumulate else x0
            new = np.clip(start + eps * np.sign(g_adv), lo, hi)
            if idgi:
                q = g_lab * g_lab
                acc += q * (f(start, init) - f(new, init)) / q.sum()
            else:
                acc += -g_lab * (new - start)
            xp = new
        else:
            it = max_iter
        maps.append(acc)
        used.append(it)
    return np.array(maps), used


@pytest.mark.parametrize("accumulate", [True, False])
@pytest.mark.parametrize("output", ["probability", "logit"])
def test_agi_matches_reference(accumulate, output):
    m = ConvNet("NCHW", num_classes=7)
    x = np.random.default_rng(3).uniform(0, 1, (3, *m.input_shape)).astype(np.float32)
    classes = [0, 2, 5, 6]
    total, per = explain(
        m, x, "agi", output=output, classes=classes, eps=0.03, max_steps=6,
        accumulate=accumulate, return_per_class=True,
    )  # fmt: skip
    init = m.predict(x).argmax(1)
    for i in range(3):
        adv = [c for c in classes if c != init[i]]
        ref, _ = reference_agi(m, x[i], init[i], adv, 0.03, 6, accumulate, output)
        k = len(adv)
        assert rel_err(per[i, :k], ref) < 1e-5
        np.testing.assert_array_equal(per[i, k:], 0)
        assert rel_err(total[i], ref.sum(0)) < 1e-5


@pytest.mark.parametrize("accumulate", [True, False])
def test_agi_double_softmax_preset_matches_reference(accumulate):
    """AGI_quantitive.py: softmax applied to a Softmax-ended model; one weighted gradient call per
    step reproduces the explicit-Jacobian chain rule, and differs from the single softmax."""
    m = ConvNet("NCHW", num_classes=6)
    x = np.random.default_rng(7).uniform(0, 1, (2, *m.input_shape)).astype(np.float32)
    classes = [0, 3, 5]
    kw = dict(classes=classes, eps=0.05, max_steps=5, accumulate=accumulate, return_per_class=True)
    total, per = explain(m, x, "agi", double_softmax=True, **kw)
    single, _ = explain(m, x, "agi", **kw)
    init = m.predict(x).argmax(1)
    for i in range(2):
        adv = [c for c in classes if c != init[i]]
        ref, _ = reference_agi(m, x[i], init[i], adv, 0.05, 5, accumulate, "probability", double=True)
        assert rel_err(per[i, : len(adv)], ref) < 1e-5
    assert rel_err(total, single) > 1e-2  # a different method, not a rescaling of the same map
    with pytest.raises(ValueError, match="double_softmax"):
        explain(m, x, "agi", double_softmax=True, output="logit")


@pytest.mark.parametrize("accumulate", [True, False])
def test_agi_idgi_matches_reference_and_telescopes(accumulate):
    m = TanhNet((3, 2, 2), 5)
    x = np.random.default_rng(0).uniform(0, 1, (2, 3, 2, 2)).astype(np.float32)
    total, per = explain(
        m, x, "agi", classes=3, selection="most_likely", eps=0.05, max_steps=5,
        accumulate=accumulate, idgi=True, return_per_class=True,
    )  # fmt: skip
    logits = m.predict(x)
    init = logits.argmax(1)
    adv = select_classes(init, logits.astype(float), 3, "most_likely", 0)
    for i in range(2):
        ref, _ = reference_agi(m, x[i], init[i], adv[i], 0.05, 5, accumulate, "probability", True)
        assert rel_err(per[i], ref) < 1e-5
    if accumulate:  # path telescopes: Σ per-class map = f(x0) − f(x_final)
        assert np.all(per.reshape(2, 3, -1).sum(-1) > 0)


def test_agi_early_stop_and_explained_class_never_adversarial():
    m = LinearSoftmax((4,), 4, seed=2)
    x = np.random.default_rng(1).uniform(0, 1, (5, 4)).astype(np.float32)
    init = m.predict(x).argmax(1)
    total, per = explain(m, x, "agi", output="logit", classes=3, eps=0.5, max_steps=10, return_per_class=True)
    adv = select_classes(init, m.predict(x).astype(float), 3, "random", 0)
    assert adv.shape == (5, 3) and not np.any(adv == init[:, None])
    stops = 0
    for i in range(5):
        ref, used = reference_agi(m, x[i], init[i], adv[i], 0.5, 10, True, "logit")
        stops += sum(u < 10 for u in used)
        assert rel_err(per[i], ref) < 1e-5
    assert stops > 0  # eps=0.5 flips the prediction: the early stop fired and was reproduced
    # stopped pairs leave the batch: fewer than 2·N·k rows per step once classes flip
    m.reset_counts()
    explain(m, x, "agi", output="logit", classes=3, eps=0.5, max_steps=10)
    assert m.calls["gradient"] <= 10 and m.rows["gradient"] < 10 * 2 * 5 * 3
    # after a step where many pairs stopped, the stop check runs on a separate predict first
    assert m.calls["predict"] > 1


def test_agi_batches_one_gradient_call_per_step():
    m = ConvNet("NHWC", num_classes=9)
    x = np.random.default_rng(2).uniform(0, 1, (3, *m.input_shape)).astype(np.float32)
    m.reset_counts()
    explain(m, x, "agi", classes=4, eps=0.001, max_steps=5)  # tiny eps: no class flips
    # the logits for the stop check come with each step's gradient call: one predict, at x0
    assert m.calls == {"predict": 1, "gradient": 5}
    assert m.rows["gradient"] == 5 * 2 * 3 * 4
    m.reset_counts()
    explain(m, x, "agi", classes=4, eps=0.001, max_steps=5, path="straight")
    assert m.calls == {"predict": 1, "gradient": 6}  # 5 adversarial steps + one straight-line call
    assert m.rows["gradient"] == 5 * 3 * 4 + 5 * 3 * 4


def test_agi_straight_path_is_ig_from_the_adversarial_point():
    m = LinearSoftmax((3,), 4, seed=5)
    x = np.random.default_rng(4).uniform(0.2, 0.8, (2, 3)).astype(np.float32)
    t = np.array([0, 1])
    total, per = explain(
        m, x, "agi", target=t, output="logit", classes=[2, 3], eps=0.05, max_steps=4,
        path="straight", return_per_class=True,
    )  # fmt: skip
    for i in range(2):
        for j, a in enumerate([2, 3]):
            # linear logit: the adversarial walk is along sign(W_a); IG of a linear f is exact
            xa = np.clip(x[i] + 4 * 0.05 * np.sign(m.W[a]), 0, 1)
            assert rel_err(per[i, j], (x[i] - xa) * m.W[t[i]]) < 1e-5


def test_agi_with_no_adversarial_class_left_is_zero():
    m = LinearSoftmax((3,), 4, seed=5)
    x = np.random.default_rng(4).uniform(0.2, 0.8, (2, 3)).astype(np.float32)
    for path in ("steepest", "straight"):
        out = explain(m, x, "agi", target=1, classes=[1], path=path)
        np.testing.assert_array_equal(out, 0)


def test_select_classes():
    explained = np.array([0, 66, 500])
    logits = np.random.default_rng(0).normal(size=(3, 1000))
    spaced = select_classes(explained, logits, 15, "spaced", None)
    assert spaced.shape == (3, 16)  # range(0, 999, 66): 16 ids, as AGI_main.py
    np.testing.assert_array_equal(spaced[2], np.arange(0, 999, 66))
    assert list(spaced[0, :15]) == list(range(66, 999, 66)) and spaced[0, 15] == -1
    r1 = select_classes(explained, logits, 20, "random", 3)
    r2 = select_classes(explained, logits, 20, "random", 3)
    np.testing.assert_array_equal(r1, r2)
    assert r1.shape == (3, 20) and not np.any(r1 == explained[:, None])
    assert all(len(set(r)) == 20 for r in r1)
    ll = select_classes(explained, logits, 5, "least_likely", None)
    ml = select_classes(explained, logits, 5, "most_likely", None)
    for i in range(3):
        order = [c for c in np.argsort(logits[i]) if c != explained[i]]
        assert list(ll[i]) == order[:5] and list(ml[i]) == order[::-1][:5]
    capped = select_classes(np.array([1]), logits[:1, :4], 20, "random", 0)
    assert sorted(capped[0]) == [0, 2, 3]
    explicit = select_classes(np.array([2, 3]), logits[:2, :5], [1, 2, 4], "random", 0)
    np.testing.assert_array_equal(explicit, [[1, 4, -1], [1, 2, 4]])
    with pytest.raises(ValueError):
        select_classes(explained, logits, 5, "top", None)
