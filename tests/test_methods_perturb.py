"""Forward-only perturbation methods: RISE, occlusion, XRAI.

References: RISE's ``generate_masks``/``forward`` (eclique/RISE, MIT) written here in
skimage/torch; closed-form expectations on a linear model; captum 0.9 ``Occlusion`` on an exported
torch CNN; PAIR saliency 0.2.1 ``Occlusion`` and ``XRAI`` on an analytic NHWC model. Tolerances:
float32 agreement is max |ours − ref| <= 1e-5 of max |ref|; XRAI from the same IG maps and
segments agrees to float32 rounding (PAIR's maps are float64, ours float32).
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import engine.methods.common as common
from engine.errors import ParameterError
from engine.methods import explain
from engine.methods.rise import rise_masks
from tests.analytic import ConvNet, LinearSoftmax, images, rel_err

skimage_transform = pytest.importorskip("skimage.transform")


# -- RISE -------------------------------------------------------------------------------------------


def reference_masks(n, s, p1, size, seed):
    """RISE.generate_masks with our documented draws (default_rng instead of the global RNG)."""
    rng = np.random.default_rng(seed)
    grid = (rng.random((n, s, s)) < p1).astype("float32")
    cell = np.ceil(np.array(size) / s)
    up = (s + 1) * cell
    dx = rng.integers(0, int(cell[0]), n)
    dy = rng.integers(0, int(cell[1]), n)
    out = np.empty((n, *size))
    for i in range(n):
        out[i] = skimage_transform.resize(grid[i], up, order=1, mode="reflect", anti_aliasing=False)[
            dx[i] : dx[i] + size[0], dy[i] : dy[i] + size[1]
        ]
    return out


@pytest.mark.parametrize("size, s, p1", [((32, 32), 8, 0.1), ((30, 20), 7, 0.5), ((12, 12), 12, 0.5)])
def test_rise_masks_are_the_reference_masks(size, s, p1):
    ours = rise_masks(60, s, p1, size, seed=3)
    ref = reference_masks(60, s, p1, size, seed=3)
    np.testing.assert_allclose(ours, ref.astype(np.float32), rtol=0, atol=1e-7)


def expected_linear_rise(model, x, target, s, p1):
    """E[RISE] for logits = W·vec(x) + b, output="logit", baseline 0, in closed form:
    S_k = (1/p1)(Σ_j u_j E[m_j m_k] + b p1), u_j = Σ_c W_t,c,j x_c,j, and
    E[m_j m_k] = p1² + (p1 − p1²) E_shift[Σ_cell a_j,cell a_k,cell] with a the upsampled unit grids
    (skimage), averaged over the cell_h × cell_w equally likely shifts."""
    c, h, w = model.input_shape
    cell = np.ceil(np.array((h, w)) / s).astype(int)
    up = (s + 1) * cell
    units = np.stack(
        [
            skimage_transform.resize(np.eye(s * s)[i].reshape(s, s), up, order=1, mode="reflect")
            for i in range(s * s)
        ]
    )  # (cells, up_h, up_w)
    k = np.zeros((h * w, h * w))
    for dx in range(cell[0]):
        for dy in range(cell[1]):
            a = units[:, dx : dx + h, dy : dy + w].reshape(s * s, -1)
            k += a.T @ a
    k /= cell[0] * cell[1]
    second = p1 * p1 + (p1 - p1 * p1) * k
    out = []
    for n in range(len(x)):
        u = (model.W[target[n]].reshape(c, h * w) * x[n].reshape(c, h * w)).sum(axis=0)
        out.append((u @ second + model.b[target[n]] * p1) / p1)
    return np.array(out).reshape(len(x), h, w)


def test_rise_recovers_a_linear_model_within_its_standard_error():
    model = LinearSoftmax((3, 8, 8), 4, layout="NCHW", seed=2)
    x = images(model, 2)
    target = np.array([1, 3])
    s, p1, n = 4, 0.5, 20000
    ours = explain(
        model, x, "rise", target=target, output="logit", n_masks=n, cells=s, keep_probability=p1, seed=1
    )
    expected = expected_linear_rise(model, x, target, s, p1)
    # the standard error of each pixel's mean over the n masks, from the same masks
    masks = rise_masks(n, s, p1, (8, 8), seed=1).astype(np.float64)
    logits = model.predict((masks[:, None, None] * x[None]).reshape(-1, *x.shape[1:]))
    scores = logits.reshape(n, len(x), -1)[:, np.arange(len(x)), target]  # (n, images)
    terms = scores[:, :, None, None] * masks[:, None] / p1
    stderr = terms.std(axis=0) / np.sqrt(n)
    z = np.abs(ours[:, 0] - expected) / stderr
    assert z.max() < 5.0, z.max()
    assert rel_err(ours[:, 0], expected) < 0.1  # and the estimate is close to the known map
    np.testing.assert_array_equal(ours[:, 0], ours[:, 2])  # the same map on every channel


@pytest.fixture(scope="module")
def torch_cnn(tmp_path_factory):
    """A small conv net exported with tests/gradcheck.export and loaded with engine.load."""
    torch = pytest.importorskip("torch")
    import engine
    from tests.gradcheck import export

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AvgPool2d(2),
        torch.nn.Conv2d(6, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 8 * 8, 5),
    ).eval()
    path = export(net, (3, 16, 16), tmp_path_factory.mktemp("perturb"))
    clf = engine.load(path, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).uniform(0, 1, (3, 3, 16, 16)).astype(np.float32)
    return torch, net, clf, x


def torch_rise(torch, net, x, masks, p1, gpu_batch=100):
    """RISE.forward as the reference writes it (one image, softmax model, batches of gpu_batch)."""
    masks_t = torch.from_numpy(masks).float().reshape(-1, 1, *masks.shape[1:])
    n = len(masks_t)
    with torch.no_grad():
        stack = torch.mul(masks_t, torch.from_numpy(x)[None])
        p = torch.cat([net(stack[i : min(i + gpu_batch, n)]).softmax(-1) for i in range(0, n, gpu_batch)])
        sal = torch.matmul(p.transpose(0, 1), masks_t.view(n, -1))
    return (sal.view(p.shape[1], *masks.shape[1:]) / n / p1).numpy()


def test_rise_equals_a_torch_rise_on_an_exported_cnn(torch_cnn):
    torch, net, clf, x = torch_cnn
    masks = rise_masks(300, 4, 0.3, (16, 16), seed=4)
    ref = np.stack([torch_rise(torch, net, x[i], masks, 0.3) for i in range(len(x))])
    ours = explain(clf, x, "rise", masks=masks, cells=4, keep_probability=0.3, all_classes=True)
    assert ours.shape == (3, 5, 16, 16) and ours.dtype == np.float32
    assert rel_err(ours, ref) < 1e-5
    # the target-only map is the all-classes map's row, generated masks this time
    kw = dict(n_masks=300, cells=4, keep_probability=0.3, seed=4)
    t = np.array([0, 4, 2])
    one = explain(clf, x, "rise", target=t, **kw)
    assert one.shape == x.shape
    assert rel_err(one[:, 1], ours[np.arange(3), t]) < 1e-5


def test_rise_all_classes_rows_are_the_target_maps():
    model = ConvNet("NHWC", num_classes=4)
    x = images(model, 2)
    kw = dict(n_masks=300, cells=4, keep_probability=0.5, seed=0)
    every = explain(model, x, "rise", all_classes=True, **kw)
    for t in range(4):
        one = explain(model, x, "rise", target=t, **kw)
        assert rel_err(every[:, t], one[..., 0]) < 1e-6


@pytest.mark.parametrize("method", ["rise", "occlusion"])
def test_results_do_not_depend_on_batch_size_or_memory_budget(method, monkeypatch):
    params = {"rise": dict(n_masks=500, cells=4), "occlusion": dict(window=3, stride=2)}[method]
    results = []
    for batch, chunk_bytes in [(None, None), (1, None), (7, 2000), (None, 5000), (64, 10**9)]:
        if chunk_bytes:
            monkeypatch.setattr(common, "PERTURBATION_CHUNK_BYTES", chunk_bytes)
        model = ConvNet("NCHW", batch_size=batch)
        rows: list[int] = []
        original = model.predict
        model.predict = lambda z, original=original, rows=rows: (rows.append(len(z)), original(z))[1]
        results.append(explain(model, images(model, 3), method, **params))
        if chunk_bytes == 2000:
            assert len(rows) > 3  # split into many calls, each within the chunk (or one block)
            assert max(rows) <= 64  # one runtime batch of 7 rows, or one block of 64 RISE masks
        monkeypatch.undo()
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def test_rise_memory_stays_flat_as_masks_grow(monkeypatch):
    monkeypatch.setattr(common, "PERTURBATION_CHUNK_BYTES", 512 * 1024)
    model = ConvNet("NCHW", size=(16, 16))
    x = images(model, 2)
    peaks = []
    for n in (500, 4000):
        tracemalloc.start()
        explain(model, x, "rise", target=0, n_masks=n, cells=4)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 1.5 * peaks[0], peaks


def test_rise_same_seed_same_bits_and_baseline():
    model = ConvNet("NCHW", num_classes=6)
    x = images(model, 2)
    a = explain(model, x, "rise", n_masks=200, seed=5)
    np.testing.assert_array_equal(a, explain(model, x, "rise", n_masks=200, seed=5))
    assert not np.array_equal(a, explain(model, x, "rise", n_masks=200, seed=6))
    # an explicit baseline b: the masked image is b + M ⊙ (x − b)
    b = explain(model, x, "rise", target=2, output="logit", n_masks=64, cells=4, baseline=0.5)
    masks = rise_masks(64, 4, 0.1, (8, 8), seed=0).astype(np.float64)
    pert = 0.5 + masks[:, None, None] * (x[None] - 0.5)
    logits = model.predict(pert.reshape(-1, *x.shape[1:]).astype(np.float32)).reshape(64, 2, -1)[..., 2]
    ref = np.einsum("mn,mhw->nhw", logits.astype(np.float64), masks) / (64 * 0.1)
    assert rel_err(b[:, 0], ref) < 1e-6


# -- occlusion --------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_occlusion_window_one_gives_weight_times_input(layout):
    shape = (3, 6, 5) if layout == "NCHW" else (6, 5, 3)
    model = LinearSoftmax(shape, 4, layout=layout, seed=3)
    x = images(model, 2)
    t = np.array([2, 0])
    ours = explain(model, x, "occlusion", target=t, output="logit", window=1, stride=1, fill=0.0)
    c_ax = 1 if layout == "NCHW" else 3
    wx = model.W[t].reshape(2, *shape) * x
    expected = np.broadcast_to(wx.sum(axis=c_ax, keepdims=True), x.shape)
    assert rel_err(ours, expected) < 1e-6


def test_occlusion_equals_captum(torch_cnn):
    torch, net, clf, x = torch_cnn
    from captum.attr import Occlusion

    target = clf.predict(x).argmax(1)
    softmax = lambda z: net(z).softmax(-1)  # noqa: E731
    cases = [(5, 3, 0.0, "logit"), (4, 4, 0.5, "probability"), ((3, 5), (2, 3), "white", "probability")]
    for window, stride, fill, output in cases:
        wh, ww = (window, window) if np.ndim(window) == 0 else window
        sh, sw = (stride, stride) if np.ndim(stride) == 0 else stride
        fwd = net if output == "logit" else softmax
        ref = Occlusion(fwd).attribute(
            torch.from_numpy(x),
            sliding_window_shapes=(3, wh, ww),
            strides=(3, sh, sw),
            baselines=1.0 if fill == "white" else fill,
            target=torch.from_numpy(target),
            perturbations_per_eval=64,
        )
        ours = explain(clf, x, "occlusion", output=output, window=window, stride=stride, fill=fill)
        # drops are differences of float32 scores: the error scale is the score's, not the drop's
        with torch.no_grad():
            scale = fwd(torch.from_numpy(x)).abs().max().item()
        err = np.abs(ours - ref.detach().numpy()).max()
        assert err < 1e-5 * max(np.abs(ref.detach().numpy()).max(), 0.1 * scale), (
            window,
            stride,
            fill,
            output,
        )


def test_occlusion_equals_pair_with_stride_one_and_sums():
    saliency_core = pytest.importorskip("saliency.core")
    model = ConvNet("NHWC", size=(10, 8), features=6, num_classes=6, seed=4)
    x = images(model, 2)
    target = model.predict(x).argmax(1)

    def call(x_batch, call_model_args=None, expected_keys=None):
        scores, _ = model.gradient(np.asarray(x_batch, np.float32), call_model_args["target"], "probability")
        return {saliency_core.base.OUTPUT_LAYER_VALUES: scores}

    for size, value in [(3, 0.0), (4, 0.7)]:
        ref = np.stack(
            [
                saliency_core.Occlusion().GetMask(
                    x[i], call, {"target": int(target[i])}, size=size, value=value
                )
                for i in range(2)
            ]
        )
        ours = explain(model, x, "occlusion", window=size, stride=1, fill=value, aggregate="sum")
        assert rel_err(ours, ref) < 1e-5


def test_occlusion_batches_all_windows_in_few_calls():
    model = ConvNet("NCHW", size=(16, 16), batch_size=None)
    x = images(model, 4)
    model.reset_counts()
    explain(model, x, "occlusion", window=4, stride=2)
    assert model.calls == {"predict": 2}  # the clean images, then every window of every image
    assert model.rows["predict"] == 4 + 4 * 7 * 7


# -- XRAI -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair_setup():
    saliency_core = pytest.importorskip("saliency.core")
    from scipy import ndimage

    model = ConvNet("NHWC", size=(40, 48), features=6, num_classes=6, seed=4)
    rng = np.random.default_rng(7)
    # smooth images, so Felzenszwalb finds regions of several sizes
    x = ndimage.gaussian_filter(rng.uniform(0, 1, (2, *model.input_shape)), (0, 3, 3, 0)).astype(np.float32)
    target = model.predict(x).argmax(1)

    def call(x_batch, call_model_args=None, expected_keys=None):
        _, grads = model.gradient(np.asarray(x_batch, np.float32), call_model_args["target"], "probability")
        return {saliency_core.INPUT_OUTPUT_GRADIENTS: grads}

    return saliency_core, model, x, target, call


def test_xrai_segments_are_pairs(pair_setup):
    from saliency.core import xrai as pair_xrai

    from engine.methods.xrai import xrai_segments

    _, _, x, _, _ = pair_setup
    ref = pair_xrai._get_segments_felzenszwalb(x[0])
    ours = xrai_segments(x[0])
    assert len(ours) == len(ref) > 6
    assert all(np.array_equal(a, b) for a, b in zip(ours, ref))


@pytest.mark.parametrize(
    "algorithm, area, min_diff", [("full", 1.0, 50), ("full", 0.4, 1), ("fast", 1.0, 50), ("fast", 1.0, 5)]
)
def test_xrai_equals_pair_on_the_same_ig_maps_and_segments(pair_setup, algorithm, area, min_diff):
    saliency_core, model, x, target, call = pair_setup
    from saliency.core import xrai as pair_xrai

    rng = np.random.default_rng(1)
    attributions = rng.normal(size=x.shape).astype(np.float32)
    segments = [pair_xrai._get_segments_felzenszwalb(x[i]) for i in range(2)]
    params = saliency_core.XRAIParameters(area_threshold=area, algorithm=algorithm)
    params.experimental_params["min_pixel_diff"] = min_diff
    ref_maps, ref_ranks = [], []
    for i in range(2):
        out = saliency_core.XRAI().GetMaskWithDetails(
            x[i], call, {"target": int(target[i])}, segments=segments[i],
            base_attribution=attributions[i], extra_parameters=params,
        )  # fmt: skip
        ref_maps.append(out.attribution_mask)
        ref_ranks.append(pair_xrai.XRAI._xrai(attributions[i].max(-1), segments[i], area_perc_th=area,
                                              min_pixel_diff=min_diff)[1] if algorithm == "full" else
                         pair_xrai.XRAI._xrai_fast(attributions[i].max(-1), segments[i],
                                                   min_pixel_diff=min_diff)[1])  # fmt: skip
    ours, ranks = explain(
        model, x, "xrai", attributions=attributions, segments=segments, area_threshold=area,
        min_pixel_diff=min_diff, algorithm=algorithm, return_segments=True,
    )  # fmt: skip
    ref = np.stack(ref_maps)
    assert rel_err(ours[..., 0], ref) < 1e-7
    np.testing.assert_array_equal(ours[..., 0], ours[..., 2])
    np.testing.assert_array_equal(ranks, np.stack(ref_ranks))


def test_xrai_end_to_end_equals_pair(pair_setup):
    """IG from PAIR's min/max baselines, PAIR's segmentation and selection, on both sides."""
    saliency_core, model, x, target, call = pair_setup
    params = saliency_core.XRAIParameters(steps=20)
    ref = np.stack(
        [
            saliency_core.XRAI().GetMask(x[i], call, {"target": int(target[i])}, extra_parameters=params)
            for i in range(2)
        ]
    )
    model.reset_counts()
    ours = explain(model, x, "xrai", target=target, steps=20)
    assert model.calls == {"gradient": 1} and model.rows["gradient"] == 2 * 2 * 20
    assert rel_err(ours[..., 0], ref) < 1e-5


def test_xrai_layouts_agree():
    """An NCHW model and its NHWC twin (same weights) give the same map, transposed."""
    a = ConvNet("NCHW", size=(24, 24), seed=2)
    b = ConvNet("NHWC", size=(24, 24), seed=2)
    x = images(a, 2)
    kw = dict(target=1, steps=8, min_pixel_diff=5, segment_min_size=20, segment_resize=None)
    ma = explain(a, x, "xrai", **kw)
    mb = explain(b, x.transpose(0, 2, 3, 1), "xrai", **kw)
    assert rel_err(ma.transpose(0, 2, 3, 1), mb) < 1e-6


# -- bad parameters ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, params, name",
    [
        ("rise", {"n_masks": 0}, "n_masks"),
        ("rise", {"cells": 0}, "cells"),
        ("rise", {"cells": 9}, "cells"),
        ("rise", {"keep_probability": 1.5}, "keep_probability"),
        ("rise", {"masks": np.ones((4, 3, 3))}, "masks"),
        ("rise", {"baseline": "nope"}, "baseline"),
        ("rise", {"all_classes": "yes"}, "all_classes"),
        ("occlusion", {"window": 0}, "window"),
        ("occlusion", {"window": 9}, "window"),
        ("occlusion", {"window": 3, "stride": 4}, "stride"),
        ("occlusion", {"window": 3, "stride": 1, "aggregate": "max"}, "aggregate"),
        ("occlusion", {"window": 3, "stride": 1, "fill": "nope"}, "fill"),
        ("xrai", {"algorithm": "slow"}, "algorithm"),
        ("xrai", {"steps": 1}, "steps"),
        ("xrai", {"area_threshold": 2.0}, "area_threshold"),
        ("xrai", {"attributions": np.ones((2, 3, 8, 8))}, "attributions"),
        ("xrai", {"segments": [[np.ones((8, 8), bool)]]}, "segments"),
        ("xrai", {"baselines": "black"}, "baselines"),
    ],
)
def test_bad_parameters_name_the_parameter(method, params, name):
    model = ConvNet("NCHW")
    with pytest.raises(ParameterError, match=name):
        explain(model, images(model, 3), method, **params)
