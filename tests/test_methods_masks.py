"""Mask-optimisation methods (I-GOS, iGOS++, meaningful perturbation) and their shared pieces.

References: central finite differences (mask gradient), brute-force Armijo (line search), numpy
padding + windows (baselines), and an independent torch implementation of spec §9 written below
(per image, float64, autograd through F.interpolate(align_corners=True)) on an exported small CNN:
masks after every iteration within 1e-5 of their scale.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.errors import ParameterError
from engine.methods import explain
from engine.methods.masks import (
    Perturbation,
    Upsampler,
    align_corners_matrix,
    armijo_line_search,
    regulariser,
    tv_term,
)
from engine.perturb import gaussian_blur_reflect, median_blur, opencv_gaussian_kernel
from tests.analytic import ConvNet, images, rel_err

torch = pytest.importorskip("torch")
F = torch.nn.functional

SHAPE = (3, 16, 12)  # non-square on purpose


# -- pieces -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_in, n_out", [(4, 16), (7, 224), (28, 224), (5, 12), (3, 3), (2, 9)])
def test_upsampling_matches_torch_and_adjoint_is_exact(n_in, n_out):
    rng = np.random.default_rng(0)
    m = rng.uniform(size=(2, n_in, n_in + 1))
    up = Upsampler((n_in, n_in + 1), (n_out, n_out + 3))
    ref = F.interpolate(
        torch.tensor(m)[:, None], size=(n_out, n_out + 3), mode="bilinear", align_corners=True
    )[:, 0].numpy()
    assert rel_err(up(m), ref) <= 1e-12
    g = rng.normal(size=(2, n_out, n_out + 3))
    lhs = (up(m) * g).sum()
    rhs = (m * up.adjoint(g)).sum()
    assert abs(lhs - rhs) <= 1e-12 * abs(lhs)
    assert np.allclose(align_corners_matrix(n_in, n_out).sum(axis=1), 1.0)


def test_regulariser_gradient_matches_torch_autograd():
    rng = np.random.default_rng(1)
    m = rng.uniform(0, 1, (3, 5, 4))
    m[0, 0, 0] = 1.0  # the L1 kink at M = 1: gradient 0 as torch's abs
    for beta in (1.0, 2.0, 3.0):
        value, grad = regulariser(m, np.array([1.0, 0.5, 2.0]), 20.0, beta)
        mt = torch.tensor(m, requires_grad=True)
        dr = (mt[:, 1:, :] - mt[:, :-1, :]).abs().pow(beta).flatten(1).mean(1)
        dc = (mt[:, :, 1:] - mt[:, :, :-1]).abs().pow(beta).flatten(1).mean(1)
        ref = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64) * (1 - mt).abs().flatten(1).mean(1)
        ref = ref + 20.0 * (dr + dc)
        ref.sum().backward()
        assert rel_err(value, ref.detach().numpy()) <= 1e-12
        assert rel_err(grad, mt.grad.numpy()) <= 1e-12


def test_opencv_kernel_and_reflect_101_blur():
    k = opencv_gaussian_kernel(51, 50.0)
    # the values spec §9a lists for cv2.getGaussianKernel(51, 50)
    assert abs(k[25] - 0.0204610) <= 1e-7 and abs(k[0] - 0.0180567) <= 1e-7
    assert abs(opencv_gaussian_kernel(5, 0).sum() - 1) < 1e-12
    rng = np.random.default_rng(2)
    x = rng.uniform(size=(2, 3, 9, 7)).astype(np.float32)
    k = opencv_gaussian_kernel(5, 1.5)
    pad = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (2, 2), (2, 2)), mode="reflect")  # reflect-101
    windows = np.lib.stride_tricks.sliding_window_view(pad, (5, 5), axis=(2, 3))
    ref = np.einsum("nchwij,i,j->nchw", windows, k, k)
    assert rel_err(gaussian_blur_reflect(x, 5, 1.5, (2, 3)), ref) <= 1e-6
    pad = np.pad(x, ((0, 0), (0, 0), (3, 3), (3, 3)), mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(pad, (7, 7), axis=(2, 3))
    ref = np.median(windows.reshape(*x.shape, 49), axis=-1)
    np.testing.assert_array_equal(median_blur(x, 7, (2, 3)), ref)


def _objective(pert, up, masks, alphas, weights, noise, l1, tv, beta, idx):
    pts = pert.points(up(masks), alphas, idx, noise)
    return weights @ pert.scores(pts, idx) + regulariser(masks, l1, tv, beta)[0]


def _check_mask_gradient(model, x, base, output, h, tol, beta=2.0):
    rng = np.random.default_rng(3)
    n = len(x)
    target = np.arange(n) % model.num_classes
    shape = (4, 3)
    image_shape = (x.shape[2], x.shape[3]) if model.layout == "NCHW" else (x.shape[1], x.shape[2])
    up = Upsampler(shape, image_shape)
    channels = x.shape[1] if model.layout == "NCHW" else x.shape[3]
    pert = Perturbation(model, base, x, target, output, np.full(channels, 0.05), seed=0)
    pert.dtype = x.dtype
    alphas = np.arange(1, 6) / 5.0
    weights = np.full(5, 1 / 5.0)
    idx = np.arange(n)
    noise = pert.noise(5, idx)  # fixed noise, shared by every evaluation below
    masks = rng.uniform(0.2, 0.8, (n, *shape))
    l1, tv = np.full(n, 1.0), 2.0
    _, d_up = pert.score_and_grad(pert.points(up(masks), alphas, idx, noise), alphas, weights, idx)
    grad = up.adjoint(d_up) + regulariser(masks, l1, tv, beta)[1]
    fd = np.zeros_like(masks)
    for i in range(shape[0]):
        for j in range(shape[1]):
            e = np.zeros_like(masks)
            e[:, i, j] = h
            plus = _objective(pert, up, masks + e, alphas, weights, noise, l1, tv, beta, idx)
            minus = _objective(pert, up, masks - e, alphas, weights, noise, l1, tv, beta, idx)
            fd[:, i, j] = (plus - minus) / (2 * h)
    assert rel_err(grad, fd) <= tol, rel_err(grad, fd)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("beta", [2.0, 3.0])
def test_mask_gradient_finite_differences_analytic(layout, beta):
    m = ConvNet(layout, size=(8, 6), dtype=np.float64)
    x = images(m, 2).astype(np.float64)
    base = np.full_like(x, 0.3)
    _check_mask_gradient(m, x, base, "probability", 1e-5, 1e-7, beta)


# -- line search ----------------------------------------------------------------------------------


class Quadratic:
    """q_n(M) = ½ c_n ‖M − M*_n‖², counting calls and rows."""

    def __init__(self, n, seed=0):
        rng = np.random.default_rng(seed)
        self.target = rng.uniform(0.3, 0.7, (n, 3, 3))
        self.c = rng.uniform(0.5, 50.0, n)
        self.calls, self.rows = 0, 0

    def __call__(self, masks, idx):
        self.calls += 1
        self.rows += len(idx)
        return 0.5 * self.c[idx] * ((masks - self.target[idx]) ** 2).reshape(len(idx), -1).sum(1)

    def grad(self, masks):
        return self.c[:, None, None] * (masks - self.target)


def brute_force_step(q, m, g, base, step, decay, floor, armijo):
    """The reference loop of spec §9a, one image at a time."""
    s = step
    while True:
        cand = np.clip(m - s * g, 0, 1)[None]
        if q(cand, np.array([q.n]))[0] <= base - armijo * s * (g * g).sum():
            return s
        s *= decay
        if s < floor:
            return s


def test_line_search_matches_brute_force_never_increases_and_backtracks():
    n = 40
    q = Quadratic(n)
    masks = np.random.default_rng(1).uniform(0, 1, (n, 3, 3))
    g = q.grad(masks)
    base = q(masks, np.arange(n))
    new, steps, accepted = armijo_line_search(
        q, masks, g, base, step=10.0, decay=0.2, floor=1e-5, armijo=1e-4
    )
    for i in range(n):
        q.n = i
        s = brute_force_step(q, masks[i], g[i], base[i], 10.0, 0.2, 1e-5, 1e-4)
        assert steps[i] == s
    after = q(new, np.arange(n))
    assert accepted.all() and np.all(after <= base)
    backtracks = np.round(np.log(steps / 10.0) / np.log(0.2)).astype(int)
    assert backtracks.max() >= 3  # stiff images had to backtrack several times
    assert len(set(backtracks)) >= 3  # and each image kept its own step


def test_line_search_honours_the_floor_and_batches_rounds():
    n = 3
    q = Quadratic(n)
    masks = np.random.default_rng(2).uniform(0.2, 0.8, (n, 3, 3))
    g = -q.grad(masks)  # an ascent direction: the Armijo test can never hold
    base = q(masks, np.arange(n))
    q.calls = q.rows = 0
    new, steps, accepted = armijo_line_search(q, masks, g, base, step=200.0, decay=0.2, floor=1e-5)
    # the first step below the floor, untested: 200·0.2^11 = 4.096e-6, after 11 tested steps
    np.testing.assert_allclose(steps, 200 * 0.2**11, rtol=1e-12)
    assert not accepted.any() and q.calls == 11 and q.rows == 33
    np.testing.assert_allclose(new, np.clip(masks - steps[:, None, None] * g, 0, 1))


# -- I-GOS against a torch implementation of the spec ------------------------------------------------


class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(6, 8, 3, padding=1, stride=2)
        self.fc = torch.nn.Linear(8 * 8 * 6, 5)

    def forward(self, x):
        h = torch.tanh(self.conv2(torch.tanh(self.conv1(x))))
        return self.fc(h.flatten(1))


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    import engine
    from tests.gradcheck import export

    torch.manual_seed(0)
    net = SmallCNN().eval()
    with torch.no_grad():
        net.fc.weight.mul_(15)  # confident predictions: a flat softmax leaves the mask at ones
    path = export(net, SHAPE, tmp_path_factory.mktemp("masks"))
    clf = engine.load(path, providers=["CPUExecutionProvider"])
    assert clf.layout == "NCHW"
    x = np.random.default_rng(0).uniform(0, 1, (3, *SHAPE)).astype(np.float32)
    return net.double(), clf, x


def torch_line_search(value_at, base, sq, step, taken, decay, floor, armijo, it):
    """Spec §9's backtracking on a torch objective ``value_at(s)``; returns (step, tied). A test
    |L(s) − (L0 − c·s·ΣG²)| <= 1e-6·|L0| is a tie that float32 scores cannot decide: then the step
    ``taken`` by the code under test must be one of the steps from the tie on, and is followed (so
    the masks stay comparable); otherwise it must equal this search's step."""
    s, candidates, tied = step, [], False
    while True:
        gap = value_at(s).item() - (base - armijo * s * sq)
        tied = tied or abs(gap) <= 1e-6 * abs(base)
        if tied:
            candidates.append(s)
        if gap <= 0 and not tied:
            break
        s *= decay
        if s < floor:
            candidates.append(s)
            break
    if tied:
        assert any(np.isclose(taken, c, rtol=1e-9) for c in candidates), (it, taken, candidates)
        return taken, True
    assert np.isclose(taken, s, rtol=1e-9), (it, taken, s)
    return s, False


def torch_igos(
    net,
    img,
    blur,
    category,
    *,
    mask,
    l1,
    tv,
    beta,
    iterations,
    points,
    divisor,
    step,
    line_search,
    l1_decay,
    noise,
    taken,
    decay=0.2,
    floor=1e-5,
    armijo=1e-4,
):
    """Spec §9 for ONE image, float64, autograd. ``noise(P)`` -> (P, C, H, W) or None. Returns
    the masks after every iteration (iterations, h, w) and whether each iteration's line search met
    a tie: a test |L(s) − (L0 − c·s·ΣG²)| <= 1e-6·|L0|, which float32 scores cannot decide. The
    step ``taken`` by the code under test must equal this search's step, or after a tie be one of
    the steps from the tie on (then it is followed, so the masks stay comparable)."""
    img = torch.tensor(img, dtype=torch.float64)[None]
    blur = torch.tensor(blur, dtype=torch.float64)[None]
    size = img.shape[2:]
    m = torch.ones(1, 1, *mask, dtype=torch.float64, requires_grad=True)

    def up(v):
        return F.interpolate(v, size=size, mode="bilinear", align_corners=True)

    def f(inp):
        return net(inp).softmax(-1)[:, category]

    def reg(v, l1):
        dr = (v[..., 1:, :] - v[..., :-1, :]).abs().pow(beta).mean()
        dc = (v[..., :, 1:] - v[..., :, :-1]).abs().pow(beta).mean()
        return l1 * (1 - v).abs().mean() + tv * (dr + dc)

    def integrated(v, l1):
        u = up(v)
        a = torch.arange(1, points + 1, dtype=torch.float64).view(-1, 1, 1, 1) / points
        inp = img * (a * u) + blur * (1 - a * u)
        n = noise(points)
        if n is not None:
            inp = inp + torch.tensor(n)
        return reg(v, l1) + f(inp).sum() / divisor

    def final(v, l1):
        u = up(v)
        return reg(v, l1) + f(img * u + blur * (1 - u)).sum()

    out, curve, ties = [], [], []
    for it in range(iterations):
        loss = integrated(m, l1)
        (g,) = torch.autograd.grad(loss, m)
        with torch.no_grad():
            score0 = final(m, l1) - reg(m, l1)
            curve += [score0.item()] * (2 if it == 0 else 1)
            base = final(m, l1) if line_search == "final" else loss
            objective = final if line_search == "final" else integrated
            s, tied = torch_line_search(
                lambda s, m=m, g=g, objective=objective, l1=l1: objective((m - s * g).clamp(0, 1), l1),
                base.item(),
                (g * g).sum().item(),
                step,
                taken[it],
                decay,
                floor,
                armijo,
                it,
            )
            m = (m - s * g).clamp(0, 1).requires_grad_(True)
            ties.append(tied)
        out.append(m.detach()[0, 0].numpy().copy())
        if l1_decay and iterations > 3:
            if it == int(iterations / 2) and abs(curve[0] - curve[it]) <= 0.001:
                l1 /= 10
            elif it == int(iterations / 1.25) and abs(curve[0] - curve[it]) <= 0.01:
                l1 /= 5
    return np.stack(out), np.array(ties)


@pytest.mark.parametrize("preset", ["paper", "reference"])
def test_igos_matches_torch_implementation_of_the_spec(cnn, preset):
    net, clf, x = cnn
    # l1 and tv scaled down to this 5×4 mask (the defaults suit 28×28: λ·mean spreads over 784 cells)
    params = {"mask_size": (5, 4), "iterations": 6, "points": 5, "blur_kernel": 7, "blur_sigma": 3.0}
    params.update(l1=0.05, tv=0.5)
    if preset == "paper":
        params["noise_std"] = 0.0
    heat, details = explain(clf, x, "igos", preset=preset, return_details=True, **params)
    target = clf.predict(x).argmax(1)
    blur = gaussian_blur_reflect(x, 7, 3.0, (2, 3))
    clear = 0  # line searches decided without a tie
    for n in range(len(x)):
        if preset == "reference":
            # the documented noise stream: image n's own generator, channel 0, std 0.4
            rng = np.random.default_rng(np.random.SeedSequence(0).spawn(len(x))[n])

            def noise(p, rng=rng):
                out = np.zeros((p, *SHAPE))
                out[:, 0] = rng.standard_normal((p, 1, *SHAPE[1:]))[:, 0] * 0.4
                return out

            kw = {"l1": 0.05, "divisor": 20.0, "step": 200.0, "line_search": "final", "l1_decay": True}
        else:
            kw = {"l1": 0.05, "divisor": 5.0, "step": 1000.0, "line_search": "integrated", "l1_decay": False}

            def noise(p):
                return None

        ref, ties = torch_igos(
            net,
            x[n],
            blur[n],
            int(target[n]),
            mask=(5, 4),
            tv=0.5,
            beta=2.0,
            iterations=6,
            points=5,
            noise=noise,
            taken=details["step"][:, n],
            **kw,
        )
        clear += int((~ties).sum())
        assert rel_err(details["masks"][:, n], ref) <= 1e-5, (n, rel_err(details["masks"][:, n], ref))
        assert ((ref[-1] > 0.01) & (ref[-1] < 0.99)).any()  # the masks moved, not to a bound
    assert clear >= len(x) * 3
    up = F.interpolate(
        torch.tensor(details["mask"])[:, None], size=SHAPE[1:], mode="bilinear", align_corners=True
    )
    expected = np.broadcast_to(1 - up.numpy(), x.shape)
    assert heat.shape == x.shape and rel_err(heat, expected) <= 1e-6


def test_mask_gradient_finite_differences_exported_cnn(cnn):
    _, clf, x = cnn
    base = gaussian_blur_reflect(x[:2], 7, 3.0, (2, 3))
    _check_mask_gradient(clf, x[:2], base, "probability", 1e-2, 2e-3)


def test_igos_independent_of_batch_size_and_seeded(cnn):
    _, clf, x = cnn
    params = {"mask_size": 4, "iterations": 3, "points": 4, "blur_kernel": 7, "blur_sigma": 3.0, "seed": 5}
    saved = clf.batch_size
    try:
        a = explain(clf, x, "igos", **params)
        clf.batch_size = 3
        b = explain(clf, x, "igos", **params)
    finally:
        clf.batch_size = saved
    assert rel_err(b, a) <= 1e-6
    c = explain(clf, x, "igos", **params)
    np.testing.assert_array_equal(a, c)
    d = explain(clf, x, "igos", **{**params, "seed": 6})
    assert not np.array_equal(a, d)
    # an image's map does not depend on the images optimised with it (only on the seed and its place)
    e = explain(clf, x[:1], "igos", **params)
    assert rel_err(e[0], a[0]) <= 1e-6


def test_igos_one_gradient_call_per_iteration():
    m = ConvNet("NHWC", size=(8, 8))
    x = images(m, 3)
    explain(m, x, "igos", target=1, mask_size=3, iterations=4, points=6, line_search="final")
    assert m.calls["gradient"] == 4 and m.rows["gradient"] == 4 * 6 * 3


@pytest.mark.parametrize(
    "name, value",
    [
        ("mask_size", 1),
        ("mask_size", (3,)),
        ("mask_size", 100),
        ("points", 0),
        ("iterations", -1),
        ("l1", -1.0),
        ("tv_beta", 0.5),
        ("step", 0.0),
        ("step_decay", 1.5),
        ("step_floor", -1.0),
        ("armijo", -1.0),
        ("line_search", "wolfe"),
        ("preset", "nope"),
        ("noise_std", -0.1),
        ("noise_channels", (5,)),
        ("divisor", 0.0),
        ("blur_kernel", 4),
        ("median_kernel", 0),
    ],
)
def test_igos_bad_parameters(name, value):
    m = ConvNet("NCHW", size=(8, 8))
    x = images(m, 1)
    params = {"mask_size": 3, "iterations": 1, "points": 2, name: value}
    if name == "median_kernel":
        params["baseline"] = "median"
    with pytest.raises(ParameterError, match=name):
        explain(m, x, "igos", **params)


def test_tv_weights_are_applied():
    m = np.random.default_rng(4).uniform(size=(2, 4, 5))
    wr = np.random.default_rng(5).uniform(size=(2, 3, 5))
    wc = np.random.default_rng(6).uniform(size=(2, 4, 4))
    value, grad = tv_term(m, 2.0, wr, wc)
    mt = torch.tensor(m, requires_grad=True)
    ref = (torch.tensor(wr) * (mt[:, 1:] - mt[:, :-1]) ** 2).flatten(1).mean(1)
    ref = ref + (torch.tensor(wc) * (mt[:, :, 1:] - mt[:, :, :-1]) ** 2).flatten(1).mean(1)
    ref.sum().backward()
    assert rel_err(value, ref.detach().numpy()) <= 1e-12 and rel_err(grad, mt.grad.numpy()) <= 1e-12


# -- iGOS++ and meaningful perturbation against torch implementations --------------------------------


def torch_igos_pp(net, img, blur, category, *, mask, l1, tv, beta, sigma, iterations, points, step, taken):
    """iGOS++ as ``igos_pp``'s docstring states it, ONE image, float64, autograd, no noise.
    Returns the deletion and insertion masks after every iteration (iterations, 2, h, w)."""
    img = torch.tensor(img, dtype=torch.float64)[None]
    blur = torch.tensor(blur, dtype=torch.float64)[None]
    size = img.shape[2:]
    small = F.interpolate(img, size=mask, mode="bilinear", align_corners=True)
    w_rows = torch.exp(-((small[:, :, 1:] - small[:, :, :-1]) ** 2).mean(1) / sigma)
    w_cols = torch.exp(-((small[:, :, :, 1:] - small[:, :, :, :-1]) ** 2).mean(1) / sigma)
    alphas = torch.arange(1, points + 1, dtype=torch.float64).view(-1, 1, 1, 1) / points

    def up(v):
        return F.interpolate(v, size=size, mode="bilinear", align_corners=True)

    def interval(start, end, u):
        return net(start + alphas * u * (end - start)).softmax(-1)[:, category].sum() / points

    def reg(v):
        dr = (v[..., 1:, :] - v[..., :-1, :]).abs().pow(beta)
        dc = (v[..., :, 1:] - v[..., :, :-1]).abs().pow(beta)
        bilateral = (w_rows * dr[:, 0]).mean() + (w_cols * dc[:, 0]).mean()
        return l1 * (1 - v).abs().mean() + tv * 0.5 * (dr.mean() + dc.mean() + bilateral)

    def loss(md, mi):
        ud, ui = up(md), up(mi)
        both = ud * ui
        score = interval(blur, img, ud) - interval(img, blur, ui)
        score = score + interval(blur, img, both) - interval(img, blur, both)
        return score + reg(md * mi)

    md = torch.ones(1, 1, *mask, dtype=torch.float64, requires_grad=True)
    mi = torch.ones(1, 1, *mask, dtype=torch.float64, requires_grad=True)
    out = []
    for it in range(iterations):
        value = loss(md, mi)
        gd, gi = torch.autograd.grad(value, (md, mi))
        with torch.no_grad():
            s, _ = torch_line_search(
                lambda s, md=md, mi=mi, gd=gd, gi=gi: loss(
                    (md - s * gd).clamp(0, 1), (mi - s * gi).clamp(0, 1)
                ),
                value.item(),
                ((gd * gd).sum() + (gi * gi).sum()).item(),
                step,
                taken[it],
                0.2,
                1e-5,
                1e-4,
                it,
            )
            md = (md - s * gd).clamp(0, 1).requires_grad_(True)
            mi = (mi - s * gi).clamp(0, 1).requires_grad_(True)
        out.append(np.stack([md.detach()[0, 0].numpy(), mi.detach()[0, 0].numpy()]))
    return np.stack(out)


def test_igos_pp_matches_torch_implementation(cnn):
    net, clf, x = cnn
    params = {"mask_size": (5, 4), "iterations": 4, "points": 4, "blur_kernel": 7, "blur_sigma": 3.0}
    params.update(l1=0.05, tv=0.5, bilateral_sigma=0.5, noise_std=0.0, step=100.0)
    heat, details = explain(clf, x[:2], "igos_pp", return_details=True, **params)
    target = clf.predict(x[:2]).argmax(1)
    blur = gaussian_blur_reflect(x[:2], 7, 3.0, (2, 3))
    for n in range(2):
        ref = torch_igos_pp(
            net,
            x[n],
            blur[n],
            int(target[n]),
            mask=(5, 4),
            l1=0.05,
            tv=0.5,
            beta=2.0,
            sigma=0.5,
            iterations=4,
            points=4,
            step=100.0,
            taken=details["step"][:, n],
        )
        ours = np.stack([details["deletion"][:, n], details["insertion"][:, n]], axis=1)
        assert rel_err(ours, ref) <= 1e-5, (n, rel_err(ours, ref))
        assert ((ref[-1] > 0.01) & (ref[-1] < 0.99)).any()
        assert np.abs(ref[-1, 0] - ref[-1, 1]).max() > 1e-3  # the two masks differ
    up = F.interpolate(
        torch.tensor(details["mask"])[:, None], size=SHAPE[1:], mode="bilinear", align_corners=True
    )
    np.testing.assert_allclose(heat, np.broadcast_to(1 - up.numpy(), heat.shape), atol=1e-6)


def torch_mask(net, img, blur, category, *, mask, l1, tv, beta, iterations, lr, noise):
    """Meaningful perturbation as the jacobgil port, ONE image, float64, torch.optim.Adam."""
    img = torch.tensor(img, dtype=torch.float64)[None]
    blur = torch.tensor(blur, dtype=torch.float64)[None]
    m = torch.ones(1, 1, *mask, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([m], lr=lr)
    losses = []
    for _ in range(iterations):
        u = F.interpolate(m, size=img.shape[2:], mode="bilinear", align_corners=True)
        inp = img * u + blur * (1 - u) + torch.tensor(noise())
        dr = (m[..., 1:, :] - m[..., :-1, :]).abs().pow(beta).mean()
        dc = (m[..., :, 1:] - m[..., :, :-1]).abs().pow(beta).mean()
        loss = l1 * (1 - m).abs().mean() + tv * (dr + dc) + net(inp).softmax(-1)[0, category]
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.data.clamp_(0, 1)
        losses.append(loss.item())
    return m.detach()[0, 0].numpy(), np.array(losses)


def test_meaningful_perturbation_matches_torch_adam(cnn):
    net, clf, x = cnn
    params = {"mask_size": (5, 4), "iterations": 8, "median_kernel": 3, "learning_rate": 0.05, "seed": 3}
    heat, details = explain(clf, x, "mask", return_details=True, **params)
    target = clf.predict(x).argmax(1)
    blur = median_blur(x, 3, (2, 3))
    for n in range(len(x)):
        rng = np.random.default_rng(np.random.SeedSequence(3).spawn(len(x))[n])

        def noise(rng=rng):
            return rng.standard_normal((1, *SHAPE))[0] * 0.2  # every channel, the documented stream

        ref, losses = torch_mask(
            net,
            x[n],
            blur[n],
            int(target[n]),
            mask=(5, 4),
            l1=0.01,
            tv=0.2,
            beta=3.0,
            iterations=8,
            lr=0.05,
            noise=noise,
        )
        assert rel_err(details["mask"][n], ref) <= 1e-5, (n, rel_err(details["mask"][n], ref))
        assert rel_err(details["loss"][:, n], losses) <= 1e-5
        assert ((ref > 0.01) & (ref < 0.99)).any()


@pytest.mark.parametrize("method", ["igos_pp", "mask"])
def test_mask_methods_seeded_and_batch_size_free(cnn, method):
    _, clf, x = cnn
    params = {
        "mask_size": 4,
        "iterations": 3,
        "blur_kernel": 7,
        "blur_sigma": 3.0,
        "median_kernel": 3,
        "seed": 5,
    }
    if method == "igos_pp":
        params["points"] = 3
    saved = clf.batch_size
    try:
        a = explain(clf, x, method, **params)
        clf.batch_size = 2
        b = explain(clf, x, method, **params)
    finally:
        clf.batch_size = saved
    assert rel_err(b, a) <= 1e-6
    np.testing.assert_array_equal(a, explain(clf, x, method, **params))
    assert not np.array_equal(a, explain(clf, x, method, **{**params, "seed": 6}))


@pytest.mark.parametrize(
    "method, name, value",
    [
        ("igos_pp", "bilateral_sigma", 0.0),
        ("igos_pp", "points", 0),
        ("igos_pp", "step_decay", 0.0),
        ("igos_pp", "mask_size", (2, 2, 2)),
        ("mask", "learning_rate", -1.0),
        ("mask", "adam_betas", (0.9, 1.0)),
        ("mask", "adam_eps", float("nan")),
        ("mask", "tv_beta", 0.0),
        ("mask", "preset", "fast"),
    ],
)
def test_mask_methods_bad_parameters(method, name, value):
    m = ConvNet("NCHW", size=(8, 8))
    with pytest.raises(ParameterError, match=name):
        explain(m, images(m, 1), method, **{"mask_size": 3, "iterations": 1, "median_kernel": 3, name: value})


def test_presets_are_data_and_explicit_parameters_win():
    from engine.methods.igos import IGOS_PRESETS

    m = ConvNet("NCHW", size=(8, 8))
    x = images(m, 2)
    common = {"mask_size": 3, "points": 2, "blur_kernel": 5, "blur_sigma": 2.0, "return_details": True}
    _, ref = explain(m, x, "igos", preset="reference", iterations=4, **common)
    _, own = explain(m, x, "igos", iterations=4, **common, **IGOS_PRESETS["reference"])
    np.testing.assert_array_equal(ref["masks"], own["masks"])
    assert ref["step"].max() <= 200.0
    _, mine = explain(m, x, "igos", preset="reference", iterations=4, step=7.0, **common)
    assert mine["step"].max() <= 7.0 and not np.array_equal(mine["masks"], ref["masks"])
    _, swapped = explain(m, x, "igos", preset="igos_pp_main", **{**common, "points": 20})
    assert swapped["masks"].shape[0] == 20


@pytest.mark.parametrize("method", ["igos", "igos_pp", "mask"])
def test_layouts_agree(method):
    """The NHWC ConvNet is the NCHW one on transposed inputs: the maps must be the transposed maps."""
    nchw, nhwc = ConvNet("NCHW", size=(8, 6)), ConvNet("NHWC", size=(8, 6))
    x = images(nchw, 2)
    params = {"mask_size": (3, 2), "iterations": 3, "blur_kernel": 5, "blur_sigma": 2.0, "median_kernel": 3}
    if method != "mask":
        params["points"] = 3
    a = explain(nchw, x, method, target=1, **params)
    b = explain(nhwc, x.transpose(0, 2, 3, 1), method, target=1, **params)
    assert rel_err(b, a.transpose(0, 2, 3, 1)) <= 1e-6 and np.abs(a).max() > 0


def test_mixed_baseline_is_the_mean_of_blur_and_median():
    from engine.perturb import mask_baseline

    m = ConvNet("NCHW", size=(8, 8))
    x = images(m, 2)
    mixed = mask_baseline(m, x, "mixed", blur_kernel=5, blur_sigma=2.0, median_kernel=3)
    expected = (gaussian_blur_reflect(x, 5, 2.0, (2, 3)).astype(np.float64) + median_blur(x, 3, (2, 3))) / 2
    assert rel_err(mixed, expected) <= 1e-7
    np.testing.assert_array_equal(mask_baseline(m, x, "black"), np.zeros_like(x))
