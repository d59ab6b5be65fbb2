"""Insertion/deletion, SIC/AIC and the pointing game against independent references.

* RISE ``CausalMetric.single_run`` re-implemented here from specs/metrics.md §2a (numpy view
  assignment, reversed argsort, per-channel union, RISE's AUC) and the IGOS_pp loop from §4b with
  torch's bilinear upsampling and a torch reflect-101 Gaussian blur: curves equal (exactly where
  the perturbed images are bit-identical, else within 1e-6 of the score scale).
* PAIR saliency 0.2.1 ``compute_pic_metric`` / ``aggregate_individual_pic_results`` with the same
  random mask, thresholds and a pred_func over the same analytic model: curves to 1e-9.
* The IDGI insertion formula and the pointing game on hand-made cases with known answers.
Models are tests/analytic.py closed-form numpy models on small images.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from engine import evaluate
from engine.errors import InputError, ParameterError
from engine.metadata import ModelInfo
from engine.metrics import common
from engine.metrics.causal import causal_curves
from engine.metrics.pic import aggregate_pic, bokeh_image, single_threaded_lapack
from engine.metrics.pointing import pointing_accuracy
from engine.perturb import rise_blur_kernel

try:
    from analytic import ConvNet, LinearSoftmax
except ImportError:  # tests/ is a package
    from tests.analytic import ConvNet, LinearSoftmax

pic = pytest.importorskip("saliency.metrics.pic")

# specs/metrics.md §2: the 1-D factor of RISE's kernel, as printed there (8 significant digits)
RISE_K = [0.08795815, 0.08889612, 0.0904742, 0.09219112, 0.09348939, 0.09398206] + [
    0.09348939,
    0.09219112,
    0.0904742,
    0.08889612,
    0.08795815,
]


def softmax(logits):
    z = np.asarray(logits, np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# ------------------------------------------------------------------ RISE reference (spec §2a)


def rise_single_run(model, img, explanation, mode, step, substrate_fn):
    """CausalMetric.single_run as specified: img (C, H, W); explanation (C', H, W)."""
    c, h, w = img.shape
    hw = h * w
    n_steps = (hw + step - 1) // step
    if mode == "del":
        start, finish = img.copy(), substrate_fn(img)
    else:
        start, finish = substrate_fn(img), img.copy()
    label = int(model.predict(img[None]).argmax())
    order = np.argsort(explanation.reshape(-1, hw), axis=1)[:, ::-1]
    scores = np.empty(n_steps + 1)
    for i in range(n_steps + 1):
        scores[i] = softmax(model.predict(start[None]))[0, label]
        if i < n_steps:
            coords = order[:, step * i : step * (i + 1)]
            view = start.reshape(1, c, hw)  # a view: the assignment writes into start
            view[0, :, coords] = finish.reshape(1, c, hw)[0, :, coords]
    return scores


def rise_auc(arr):
    return (arr.sum() - arr[0] / 2 - arr[-1] / 2) / (arr.shape[0] - 1)


def zero_padded_blur(z):
    """conv2d(z, gkern(11, 5), padding=5) per channel, by shifted sums (not ndimage)."""
    delta = np.zeros((11, 11))
    delta[5, 5] = 1
    k = ndimage.gaussian_filter(delta, 5).astype(np.float32).astype(np.float64)
    c, h, w = z.shape
    padded = np.pad(z, ((0, 0), (5, 5), (5, 5)))
    out = np.zeros_like(z, dtype=np.float64)
    for a in range(11):
        for b in range(11):
            out += k[a, b] * padded[:, a : a + h, b : b + w]
    return out


MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def conv():
    model = ConvNet("NCHW", size=(12, 12), features=4, num_classes=5, seed=3)
    x = np.random.default_rng(5).uniform(0, 1, (3, *model.input_shape)).astype(np.float32)
    return model, x


def test_rise_kernel_has_riseS_values():
    k = rise_blur_kernel()
    assert k.dtype == np.float32 and k.shape == (11, 11)
    np.testing.assert_allclose(k, np.outer(RISE_K, RISE_K), rtol=2e-7)
    assert abs(float(k.sum()) - 1) < 1e-6


@pytest.mark.parametrize("channels", [1, 3])
def test_rise_deletion_insertion_match_reference(conv, channels):
    model, x = conv
    rng = np.random.default_rng(11 + channels)
    maps = rng.normal(size=(len(x), channels, 12, 12))
    step = 7  # 144 pixels: 20 full steps and a partial one
    given = maps[:, 0] if channels == 1 else maps
    ours = causal_curves(model, x, given, preset="rise", step=step, mean_std=(MEAN, STD))
    deletion, insertion = ours[len(x) :], ours[: len(x)]
    mean_img = np.broadcast_to(MEAN.reshape(3, 1, 1), x.shape[1:]).astype(np.float32)

    def blur(img):  # RISE's substrate in the normalised space, mapped back to pixels
        z = (img.astype(np.float64) - MEAN.reshape(3, 1, 1)) / STD.reshape(3, 1, 1)
        return (zero_padded_blur(z) * STD.reshape(3, 1, 1) + MEAN.reshape(3, 1, 1)).astype(np.float32)

    for i in range(len(x)):
        ref_del = rise_single_run(model, x[i], maps[i], "del", step, lambda img: mean_img.copy())
        ref_ins = rise_single_run(model, x[i], maps[i], "ins", step, blur)
        # deletion: the same float32 images, so the same scores bit for bit
        np.testing.assert_array_equal(deletion[i].curve_y, ref_del)
        assert deletion[i].score == pytest.approx(rise_auc(ref_del), rel=1e-12)
        np.testing.assert_allclose(insertion[i].curve_y, ref_ins, rtol=0, atol=1e-6)
        assert insertion[i].score == pytest.approx(rise_auc(ref_ins), abs=1e-6)
        assert len(ref_del) == 22 and deletion[i].curve_x[-1] == 1.0
        assert deletion[i].params["reduce"] == "per_channel" and not deletion[i].higher_is_better


def test_agi_preset_matches_reference(conv):
    model, x = conv
    maps = np.random.default_rng(2).normal(size=x.shape)
    ours = evaluate(model, x, maps, "insertion", preset="agi", step=10)
    black = lambda img: np.zeros_like(img)  # noqa: E731
    for i in range(len(x)):
        ref = rise_single_run(model, x[i], maps[i], "ins", 10, black)
        np.testing.assert_array_equal(ours[i].curve_y, ref)
        assert ours[i].score == pytest.approx(ref.mean(), rel=1e-12)  # AGI reports the mean


# ------------------------------------------------------------------ IGOS_pp reference (spec §4b)


def test_igos_presets_match_reference_loop():
    torch = pytest.importorskip("torch")
    f = torch.nn.functional
    model = ConvNet("NCHW", size=(32, 32), features=3, num_classes=4, seed=8)
    x = np.random.default_rng(4).uniform(0, 1, (2, *model.input_shape)).astype(np.float32)
    masks = np.random.default_rng(6).uniform(size=(2, 8, 8))  # I-GOS masks: low = salient
    ours = causal_curves(model, x, masks, preset="igos", order="ascending")
    buggy = causal_curves(model, x, masks, preset="reference_bug", order="ascending")

    i = np.arange(51) - 25.0  # cv2.getGaussianKernel(51, 50) as OpenCV documents it
    g = np.exp(-(i**2) / (2 * 50.0**2))
    g = torch.tensor(g / g.sum())
    xt = torch.tensor(x, dtype=torch.float64)
    padded = f.pad(xt, (25, 25, 25, 25), mode="reflect")  # reflect-101 = OpenCV's default border
    weight = (g[:, None] * g[None, :]).expand(3, 1, 51, 51)
    blur = f.conv2d(padded, weight, groups=3)

    def prob(img, target):
        return softmax(model.predict(img.numpy().astype(np.float32)))[0, target]

    for n in range(2):
        target = int(model.predict(x[n : n + 1]).argmax())
        cells = 64
        step = max(1, cells // 50)
        order = np.argsort(masks[n].reshape(-1))
        keep = np.ones(cells)
        dels, inss = [prob(xt[n : n + 1], target)], [prob(blur[n : n + 1], target)]
        score_del = score_ins = bug_del = 0.0
        for k in range(0, cells, step):
            keep[order[k : k + step]] = 0
            u = f.interpolate(
                torch.tensor(keep.reshape(1, 1, 8, 8)), size=(32, 32), mode="bilinear", align_corners=True
            )
            pd = prob(xt[n : n + 1] * u + blur[n : n + 1] * (1 - u), target)
            pi = prob(blur[n : n + 1] * u + xt[n : n + 1] * (1 - u), target)
            dels.append(pd)
            inss.append(pi)
            width = step if k + step < cells else cells - k
            score_del += pd * width
            score_ins += pi * width
            bug_del += pd * step if k + step < cells else cells - k
        np.testing.assert_allclose(ours[n].curve_y, inss, atol=1e-6)
        np.testing.assert_allclose(ours[2 + n].curve_y, dels, atol=1e-6)
        assert ours[n].score == pytest.approx(score_ins / cells, abs=1e-6)
        assert ours[2 + n].score == pytest.approx(score_del / cells, abs=1e-6)
        assert buggy[2 + n].score == pytest.approx(bug_del / cells, abs=1e-6)
        assert buggy[2 + n].score - ours[2 + n].score == pytest.approx((1 - dels[-1]) / cells, abs=1e-6)


# ------------------------------------------------------------------ IDGI (spec §5), by hand


def test_idgi_insertion_on_a_hand_computed_case():
    # a 2×2 one-channel image; logits = W·vec(x) + b, so every probability is closed-form
    model = LinearSoftmax((1, 2, 2), num_classes=3, seed=1, layout="NCHW")
    x = np.array([[[[0.9, 0.2], [0.5, 0.7]]]], np.float32)
    saliency = np.array([[[0.1, 0.4], [0.3, 0.2]]])  # order: pixel 1, 2, 3, 0
    target = 2
    res = evaluate(model, x, saliency, "insertion", preset="idgi", target=target)[0]
    counts = [0] * 5 + [1] * 5 + [2] * 5 + [3] * 5 + [4]  # (0, 5, ..., 100 %) of 4 pixels, truncated
    order = [1, 2, 3, 0]
    p = []
    for k in counts:
        img = np.zeros(4)
        img[order[:k]] = x.reshape(-1)[order[:k]]
        p.append(model.score(img.reshape(1, 1, 2, 2), target, "probability")[0])
    p = np.array(p)
    by_hand = 0.05 * (p.sum() - p[0] / 2 - p[-1] / 2)
    ratio = 0.05 * ((p / p[-1]).sum() - p[0] / p[-1] / 2 - 1 / 2)
    np.testing.assert_allclose(res.curve_x, np.array(counts) / 4)
    np.testing.assert_allclose(res.curve_y, p, rtol=1e-6)
    assert res.score == pytest.approx(by_hand, rel=1e-6)
    assert res.extra["auc_probability_ratio"] == pytest.approx(ratio, rel=1e-6)
    both = evaluate(model, x, saliency, "insertion", preset="idgi", target=target, score="probability_ratio")
    assert both[0].score == pytest.approx(ratio, rel=1e-6)


def test_substrates_and_normalised_zero_from_metadata(conv):
    model, x = conv
    maps = np.random.default_rng(0).normal(size=(len(x), 12, 12))
    model.info = ModelInfo(preprocessing={"mean": MEAN.tolist(), "std": STD.tolist(), "in_graph": True})
    try:
        meta = causal_curves(model, x, maps, modes=("deletion",), step=30)
    finally:
        del model.info
    given = causal_curves(model, x, maps, modes=("deletion",), step=30, mean_std=(MEAN, STD))
    mean_img = np.broadcast_to(MEAN.reshape(3, 1, 1), x.shape).astype(np.float32)
    as_array = causal_curves(model, x, maps, modes=("deletion",), step=30, substrate=mean_img)
    for a, b, c in zip(meta, given, as_array, strict=True):
        np.testing.assert_array_equal(a.curve_y, b.curve_y)
        np.testing.assert_array_equal(a.curve_y, c.curve_y)
        assert a.params["mean_std"][0] == pytest.approx(MEAN.tolist())
    # "mean": each image's own mean colour is the end point of its deletion curve
    res = causal_curves(model, x, maps, modes=("deletion",), step=30, substrate="mean")
    sub = np.broadcast_to(x.mean(axis=(2, 3), keepdims=True, dtype=np.float64), x.shape).astype(np.float32)
    target = model.predict(x).argmax(1)
    end = softmax(model.predict(sub))[np.arange(len(x)), target]
    np.testing.assert_allclose([r.curve_y[-1] for r in res], end, rtol=1e-12)


# ------------------------------------------------------------------ batching


def test_batching_and_chunks_change_no_score(conv, monkeypatch):
    model, x = conv
    maps = np.random.default_rng(9).normal(size=(2, len(x), *x.shape[1:]))  # 2 maps per image
    ref = causal_curves(model, x, maps, step=9)
    model.reset_counts()
    for batch, chunk in [(1, 10**9), (7, 12_000), (None, 5_000)]:
        model.batch_size = batch
        monkeypatch.setattr(common, "CHUNK_BYTES", chunk)
        model.reset_counts()
        got = causal_curves(model, x, maps, step=9)
        rows = 2 * 2 * 3 * 15  # modes × maps × images × interior points (16 counts)
        per_chunk = common.chunk_rows(model, x[0].nbytes * 4, rows)
        assert model.calls["predict"] == 1 + -(-rows // per_chunk)
        for a, b in zip(got, ref, strict=True):
            np.testing.assert_allclose(a.curve_y, b.curve_y, rtol=1e-6, atol=0)
            assert a.score == pytest.approx(b.score, rel=1e-6)
    model.batch_size = None
    # map m of the stacked call is the same as that map alone
    alone = causal_curves(model, x, maps[1], step=9)
    stacked = [r for r in ref if r.extra["map_index"] == 1]
    for a, b in zip(alone, stacked, strict=True):
        np.testing.assert_allclose(a.curve_y, b.curve_y, rtol=1e-6)


def test_layouts_and_reductions_agree(conv):
    model, x = conv
    maps = np.random.default_rng(4).normal(size=x.shape)
    twin = ConvNet("NHWC", size=(12, 12), features=4, num_classes=5, seed=3)  # same weights
    for preset in ("paper", "rise", "igos", "idgi"):
        a = causal_curves(model, x, maps, preset=preset, step=None if preset in ("igos", "idgi") else 11)
        b = causal_curves(
            twin,
            x.transpose(0, 2, 3, 1),
            maps.transpose(0, 2, 3, 1),
            preset=preset,
            step=None if preset in ("igos", "idgi") else 11,
        )
        for r, t in zip(a, b, strict=True):
            np.testing.assert_allclose(r.curve_y, t.curve_y, rtol=1e-6)
    # "paper" on a 3-channel map = any preset's "sum" rule = the summed 2-D map itself
    summed = causal_curves(model, x, maps.sum(axis=1), preset="rise", step=11)
    paper = causal_curves(model, x, maps, preset="paper", step=11)
    for r, t in zip(summed, paper, strict=True):
        np.testing.assert_array_equal(r.curve_y, t.curve_y)


def test_memory_stays_flat_as_steps_grow(monkeypatch):
    import tracemalloc

    model = ConvNet("NCHW", size=(32, 32), features=4, num_classes=5, seed=3)
    x = np.random.default_rng(5).uniform(0, 1, (3, *model.input_shape)).astype(np.float32)
    maps = np.random.default_rng(9).normal(size=(2, 3, 32, 32))
    monkeypatch.setattr(common, "CHUNK_BYTES", 200_000)
    peaks = {}
    for step in (200, 2):  # 7 and 513 points per curve: 2 modes x 2 maps x 3 images
        tracemalloc.start()
        causal_curves(model, x, maps, step=step)
        peaks[step] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    all_images = 2 * 2 * 3 * 513 * x[0].nbytes  # 74 MB, had they been materialised
    assert peaks[2] < 1.2 * peaks[200] and peaks[2] < all_images / 20


# ------------------------------------------------------------------ PIC vs PAIR saliency


@pytest.fixture(scope="module")
def pic_case():
    model = ConvNet("NHWC", size=(24, 24), features=4, num_classes=5, seed=2)
    rng = np.random.default_rng(3)
    u8 = rng.integers(0, 256, (3, 24, 24, 3)).astype(np.uint8)
    x = u8.astype(np.float32) / np.float32(255)
    target = model.predict(x).argmax(1)
    maps = rng.normal(size=(2, 3, 24, 24))  # two "methods"
    state = np.random.get_state()
    np.random.seed(0)
    rmask = np.stack([pic.generate_random_mask(24, 24, 0.05) for _ in range(3)])
    np.random.set_state(state)
    return model, u8, x, target, maps, rmask


def pair_pred_func(model, cls, kind):
    def pred(batch):
        logits = model.predict(batch.astype(np.float32) / np.float32(255))
        if kind == "aic":
            return list((logits.argmax(1) == cls).astype(np.float64))
        return list(softmax(logits)[:, cls])

    return pred


@pytest.mark.parametrize("kind", ["sic", "aic"])
def test_pic_matches_pair_saliency(pic_case, monkeypatch, kind):
    monkeypatch.setattr(np, "trapz", np.trapezoid, raising=False)  # PAIR 0.2.1 calls np.trapz
    model, u8, x, target, maps, rmask = pic_case
    thresholds = [0.01, 0.03, 0.1, 0.21, 0.5, 0.75]
    common_args = {"target": target, "random_mask": rmask, "reduce": "sum", "thresholds": thresholds}
    min_pred = 0.0 if kind == "sic" else 0.5
    model.reset_counts()
    ours = evaluate(
        model, x, maps, kind, min_pred_value=min_pred, keep_monotonous=kind == "sic", **common_args
    )
    assert model.calls["predict"] == 2  # originals + blurred, then every bokeh image in one chunk
    one_thread = evaluate(
        model, x, maps, kind, min_pred_value=min_pred, keep_monotonous=kind == "sic", workers=1, **common_args
    )
    for a, b in zip(ours, one_thread, strict=True):
        np.testing.assert_array_equal(
            a.curve_y if a.curve_y is not None else [], b.curve_y if b.curve_y is not None else []
        )
    compared = skipped = 0
    for m in range(2):
        refs = []
        for i in range(3):
            got = ours[m * 3 + i]
            try:
                with single_threaded_lapack():  # same result, without OpenBLAS's thread wake-ups
                    ref = pic.compute_pic_metric(
                        u8[i],
                        maps[m, i],
                        rmask[i],
                        pair_pred_func(model, target[i], kind),
                        thresholds,
                        min_pred_value=min_pred,
                        keep_monotonous=kind == "sic",
                    )
            except pic.ComputePicMetricError:
                assert got.extra["skipped"] and np.isnan(got.score)
                skipped += 1
                continue
            refs.append(ref)
            assert got.extra["skipped"] is None
            np.testing.assert_allclose(got.curve_x, ref.curve_x, rtol=0, atol=1e-12)
            np.testing.assert_allclose(got.curve_y, ref.curve_y, rtol=0, atol=1e-9)
            assert got.score == pytest.approx(ref.auc, abs=1e-9)
            np.testing.assert_allclose(got.extra["predictions"], ref.predictions, atol=1e-12)
            compared += 1
        mine = aggregate_pic(ours[m * 3 : m * 3 + 3], "median" if kind == "sic" else "mean")
        theirs = pic.aggregate_individual_pic_results(refs, "median" if kind == "sic" else "mean")
        np.testing.assert_allclose(mine.curve_y, theirs.curve_y, atol=1e-9)
        assert mine.score == pytest.approx(theirs.auc, abs=1e-9)
    assert compared >= 2 and skipped >= 1  # the third image's blurred score beats the original's


def test_bokeh_image_equals_pair_create_blurred_image():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (40, 36, 3)).astype(np.uint8)
    for fraction in (0.0, 0.01, 0.3, 0.9):
        mask = rng.uniform(size=(40, 36)) < fraction
        with single_threaded_lapack():
            theirs = pic.create_blurred_image(img, mask)
        np.testing.assert_array_equal(bokeh_image(img, mask), theirs)


def test_pic_ms_ssim_information_is_pytorch_msssim():
    torch = pytest.importorskip("torch")
    msssim = pytest.importorskip("pytorch_msssim")
    model = ConvNet("NCHW", size=(176, 176), features=2, num_classes=3, seed=1)
    rng = np.random.default_rng(2)
    base = ndimage.gaussian_filter(rng.uniform(0, 255, (176, 176, 3)), (3, 3, 0))
    u8 = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    x = (u8.astype(np.float32) / np.float32(255)).transpose(2, 0, 1)[None]
    sal = rng.normal(size=(1, 176, 176))
    thresholds = [0.3]
    rmask = np.zeros((176, 176), bool)
    rmask[::10, ::10] = True
    res = evaluate(
        model, x, sal, "sic", thresholds=thresholds, random_mask=rmask, reduce="sum", information="ms_ssim"
    )[0]
    assert res.extra["skipped"] is None, res.extra["skipped"]
    orig = torch.tensor(u8.transpose(2, 0, 1)[None] / 255.0)
    expected = []
    for t in [None, *thresholds]:
        mask = rmask if t is None else (sal[0] >= np.quantile(sal[0], 1 - t)) | rmask
        bokeh = bokeh_image(u8, mask)  # = PAIR's create_blurred_image (test above)
        b = torch.tensor(bokeh.transpose(2, 0, 1)[None] / 255.0)
        expected.append(float(msssim.ms_ssim(b, orig, data_range=1.0)))
    np.testing.assert_allclose(res.extra["information"][:-1], expected, rtol=1e-6)
    assert res.extra["information"][-1] == pytest.approx(1.0)


# ------------------------------------------------------------------ pointing game


def test_pointing_game_on_known_boxes():
    model = ConvNet("NCHW", size=(40, 40), features=2, num_classes=3, seed=0)
    x = np.zeros((5, 3, 40, 40), np.float32)
    peaks = [(10, 10), (30, 5), (20, 35), (0, 0), (39, 39)]  # (row, col) of each map's maximum
    maps = np.zeros((5, 40, 40))
    for i, (r, c) in enumerate(peaks):
        maps[i, r, c] = 1.0
    boxes = [
        [(8, 8, 12, 12)],  # contains the point: hit
        [(0, 20, 3, 25)],  # nearest box pixel (row 25, col 3): distance sqrt(25 + 4) < 15: hit
        [(20, 20, 20, 20)],  # one pixel at distance exactly 15 (strict <): miss
        [(14, 0, 14, 0), (0, 30, 2, 33)],  # 14 px away: hit
        [],  # no box: miss
    ]
    targets = [0, 0, 1, 1, 2]
    difficult = [False, True, True, False, True]
    res = evaluate(model, x, maps, "pointing_game", target=targets, boxes=boxes, difficult=difficult)
    assert [r.score for r in res] == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert res[2].extra["point"] == [20, 35]
    acc = pointing_accuracy(res)
    assert acc["per_class"] == {0: 1.0, 1: 0.5, 2: 0.0}
    assert acc["accuracy"] == pytest.approx(0.5)
    hard = pointing_accuracy(res, subset="difficult")
    assert hard["per_class"] == {0: 1.0, 1: 0.0, 2: 0.0}
    # masks instead of boxes give the same answers; a larger tolerance turns the miss into a hit
    truth = np.zeros((5, 40, 40), bool)
    for i, rows in enumerate(boxes):
        for x0, y0, x1, y1 in rows:
            truth[i, y0 : y1 + 1, x0 : x1 + 1] = True
    same = evaluate(model, x, maps, "pointing_game", target=targets, masks=truth)
    assert [r.score for r in same] == [r.score for r in res]
    wide = evaluate(model, x, maps, "pointing_game", target=targets, masks=truth, tolerance=15.01)
    assert wide[2].score == 1.0


# ------------------------------------------------------------------ bad parameters


@pytest.mark.parametrize(
    "metric, params, name",
    [
        ("insertion", {"preset": "lime"}, "preset"),
        ("insertion", {"substrate": "grey"}, "substrate"),
        ("deletion", {"step": 0}, "step"),
        ("deletion", {"auc_rule": "simpson"}, "auc_rule"),
        ("insertion", {"score": "prob"}, "score"),
        ("insertion", {"reduce": "median"}, "reduce"),
        ("insertion", {"fractions": [0.5, 0.2]}, "fractions"),
        ("insertion", {"order": "random"}, "order"),
        ("insertion", {"resolution": 5}, "resolution"),
        ("sic", {"thresholds": [0.5, 0.1]}, "thresholds"),
        ("sic", {"information": "psnr"}, "information"),
        ("aic", {"num_data_points": 0}, "num_data_points"),
        ("sic", {"workers": 0}, "workers"),
        ("pointing_game", {"tolerance": -1, "masks": np.ones((3, 12, 12), bool)}, "tolerance"),
        ("insertion", {"steps": 3}, "steps"),
    ],
)
def test_bad_parameters_raise_parameter_error_naming_them(conv, metric, params, name):
    model, x = conv
    maps = np.random.default_rng(0).normal(size=(len(x), 12, 12))
    with pytest.raises(ParameterError, match=name):
        evaluate(model, x, maps, metric, **params)


def test_bad_maps_raise_input_error(conv):
    model, x = conv
    with pytest.raises(InputError, match="attributions"):
        evaluate(model, x, np.zeros((2, 12, 12)), "insertion")
    with pytest.raises(InputError, match="exactly one of boxes"):
        evaluate(model, x, np.zeros((3, 12, 12)), "pointing_game")
