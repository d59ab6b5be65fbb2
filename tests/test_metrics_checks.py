"""Sanity checks, stability, completeness, heatmap post-processing and step-count sensitivity.

References: torch autograd and a freshly compiled model for the weight replacement; scipy and
scikit-image for the similarity measures; PAIR saliency 0.2.1 for the visualisations; the
closed-form analytic models (tests/analytic.py) for stability, completeness and the pooled IG.
"""

from __future__ import annotations

import io
import json

import numpy as np
import onnx
import pytest
import torch
from analytic import LinearSoftmax, TanhNet, images, rel_err
from gradcheck import export, relative_error, torch_gradient
from onnx import numpy_helper
from PIL import Image
from scipy import ndimage, stats

import engine
from engine.compile import cache
from engine.errors import InputError, ParameterError
from engine.initializers import derivations, find_blocks, gradient_overrides, initializer_values, redraw
from engine.methods import explain
from engine.metrics.sanity import hog_features, pearson, sanity_check, similarities, spearman
from engine.metrics.steps import step_sensitivity
from engine.postprocess import agi_clip, igos_invert, min_max, pair_diverging, pair_grayscale

CPU = ["CPUExecutionProvider"]


def small_cnn() -> torch.nn.Module:
    """Conv → ReLU → BatchNorm (after the ReLU, so torch cannot fold it into the Conv and the
    compiler folds it into Mul/Add constants) → grouped Conv → pool → two Linear layers."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.BatchNorm2d(8),
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=2),
        torch.nn.ReLU(),
        torch.nn.AvgPool2d(4),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 8 * 8, 16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, 5),
    )
    with torch.no_grad():
        bn = net[2]
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.3)
        bn.running_mean.normal_(0, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    net = small_cnn()
    path = export(net, (3, 32, 32), tmp_path_factory.mktemp("sanity"))
    clf = engine.load(path, providers=CPU)
    rng = np.random.default_rng(0)
    x = ndimage.gaussian_filter(rng.random((3, 3, 32, 32)), (0, 0, 2, 2))
    x = ((x - x.min()) / (x.max() - x.min())).astype(np.float32)
    return net, path, clf, x


def redrawn_weights(clf, seed=3):
    proto = clf.onnx_model
    values = initializer_values(proto)
    new = {}
    for block in find_blocks(proto):
        new.update(redraw(values, block, seed=seed))
    # the BatchNorm after the ReLU belongs to no block: replace its scale and shift as well
    rng = np.random.default_rng(seed)
    for name in ("2.weight", "2.bias"):
        new[name] = rng.normal(0.5, 0.5, values[name].shape).astype(np.float32)
    return new


def test_blocks_found_from_the_graph(cnn):
    _, _, clf, _ = cnn
    blocks = find_blocks(clf.onnx_model)
    assert [b.op for b in blocks] == ["Conv", "Conv", "Gemm", "Gemm"]
    assert [b.weights for b in blocks] == [
        ("0.weight", "0.bias"),
        ("3.weight", "3.bias"),
        ("7.weight", "7.bias"),
        ("9.weight", "9.bias"),
    ]


@pytest.mark.slow  # two compilations of the CNN (the second is the reference)
def test_randomised_initializers_change_logits_and_gradients_without_recompiling(cnn, monkeypatch, tmp_path):
    net, path, clf, x = cnn
    target = np.array([0, 3, 4])
    clf.gradient(x, target)  # compiled (or read from the cache) once, before counting
    calls = []
    real = cache.cached_gradient_model
    monkeypatch.setattr(cache, "cached_gradient_model", lambda *a, **k: calls.append(a) or real(*a, **k))
    entries = len(cache.entries())

    new = redrawn_weights(clf)
    randomised = clf.with_initializers(new)
    assert randomised.replaced_initializers == tuple(sorted(new))
    logits = randomised.predict(x)
    results = {out: randomised.gradient(x, target, output=out) for out in ("logit", "probability")}
    assert calls == [] and len(cache.entries()) == entries  # no builder run, no new cache entry
    # the original classifier is untouched
    assert rel_err(clf.predict(x), net(torch.tensor(x)).detach().numpy()) < 1e-5

    # reference 1: torch autograd on the module with the same weights
    ref_net = small_cnn()
    state = ref_net.state_dict()
    state.update({k: torch.tensor(v) for k, v in new.items()})
    ref_net.load_state_dict(state)
    assert rel_err(logits, ref_net(torch.tensor(x)).detach().numpy()) < 1e-5
    for out, (scores, grads) in results.items():
        ref_scores, ref_grads = torch_gradient(ref_net, x, target, out)
        assert relative_error(scores, ref_scores) < 1e-5, out
        assert relative_error(grads, ref_grads) < 1e-4, out
        old_grads = clf.gradient(x, target, output=out)[1]
        assert relative_error(grads, old_grads) > 0.1, out  # the weights really changed

    # reference 2: a model file holding the new weights, compiled afresh
    model = onnx.load(path)
    for init in model.graph.initializer:
        if init.name in new:
            init.CopyFrom(numpy_helper.from_array(new[init.name], init.name))
    fresh_path = tmp_path / "fresh.onnx"
    onnx.save(model, fresh_path)
    fresh = engine.load(fresh_path, providers=CPU)
    assert relative_error(logits, fresh.predict(x)) <= 1e-6
    for out, (_, grads) in results.items():
        assert relative_error(grads, fresh.gradient(x, target, output=out)[1]) <= 1e-6, out


def test_weight_replacement_errors(cnn):
    _, _, clf, x = cnn
    with pytest.raises(InputError, match="not in the model"):
        clf.with_initializers({"no_such_weight": np.zeros(3, np.float32)})
    with pytest.raises(InputError, match="shape"):
        clf.with_initializers({"9.bias": np.zeros(4, np.float32)})
    # a gradient model whose weight names differ from the forward model's is refused, by name
    clf.gradient(x[:1], 0)  # compiled (or cached) gradient model
    data, _ = clf._compiled[("gradient", None)]
    grad = onnx.load_from_string(data)
    # the constants the compiler computed from weights: both stride-1 Conv kernels, the BN factors
    traced = {d.target.split("/")[-1].rsplit("_", 1)[0]: d.sources for d in derivations(clf.onnx_model, grad)}
    assert sorted(traced) == ["bn_a", "bn_b", "conv_grad_kernel"]
    assert len(derivations(clf.onnx_model, grad)) == 4
    for init in grad.graph.initializer:
        if init.name == "9.weight":
            init.name = "renamed.weight"
    found = derivations(clf.onnx_model, grad)
    with pytest.raises(InputError, match="9.weight"):
        gradient_overrides(clf.onnx_model, grad, {"9.weight": np.zeros((5, 16), np.float32)}, found)


def edge_detector(model, x, target, output="probability"):
    """A 'method' that ignores the model: Sobel edge magnitude of the grey image."""
    grey = np.asarray(x, np.float64).mean(axis=1)
    edges = np.hypot(ndimage.sobel(grey, axis=1), ndimage.sobel(grey, axis=2))
    return np.repeat(edges[:, None], x.shape[1], axis=1).astype(np.float32)


def test_cascade_flags_an_edge_detector_and_passes_saliency(cnn):
    _, _, clf, x = cnn
    edges = sanity_check(clf, x, edge_detector, modes=("cascading", "independent"), seed=1)
    assert not edges.passed
    for record in edges.records:
        for measure, values in record.similarity.items():
            assert np.all(values > 0.999), (record.block, measure, values)

    report = sanity_check(clf, x, "saliency", modes=("cascading", "independent"), seed=1)
    names = [b.name for b in report.blocks]
    assert len(report.records) == 2 * len(names)
    cascade = [r for r in report.records if r.mode == "cascading"]
    assert [r.randomised for r in cascade] == [tuple(names[::-1][:k]) for k in range(1, len(names) + 1)]
    assert [r.randomised for r in report.records if r.mode == "independent"] == [(n,) for n in names[::-1]]
    fc = initializer_values(clf.onnx_model)["9.weight"]
    assert report.settings["redrawn_from"]["9.weight"] == {
        "mean": float(fc.mean(dtype=np.float64)),
        "std": float(fc.std(dtype=np.float64)),
    }
    assert json.loads(json.dumps(report.to_dict()))["records"][0]["block"] == names[-1]
    final = report.final("cascading").mean()
    assert report.passed and final["spearman_abs"] < 0.5 and final["ssim"] < 0.5, final

    # the same seed gives the same bits; another seed other weights
    again = sanity_check(clf, x, "saliency", modes=("cascading",), seed=1, maps=report.maps)
    for a, b in zip(cascade, again.records):
        assert all(np.array_equal(a.similarity[k], b.similarity[k], equal_nan=True) for k in a.similarity)
    other = sanity_check(clf, x, "saliency", modes=("cascading",), seed=2, maps=report.maps)
    assert not np.array_equal(other.records[-1].similarity["spearman"], cascade[-1].similarity["spearman"])

    # as a metric: the score is the final cascade similarity of each image
    results = engine.evaluate(clf, x, report.maps, "model_randomisation", method="saliency", seed=1)
    assert [r.score for r in results] == cascade[-1].similarity["spearman_abs"].tolist()
    assert not results[0].higher_is_better and len(results[0].curve_y) == len(names)

    # data randomisation: a second model; the trained model itself as the "second model" is flagged
    data = sanity_check(clf, x, "saliency", modes=("data",), data_model=clf, maps=report.maps)
    assert not data.passed and np.allclose(data.records[0].similarity["spearman"], 1.0)
    with pytest.raises(ParameterError, match="data_model"):
        sanity_check(clf, x, "saliency", modes=("data",))


def test_similarity_measures_against_scipy_and_skimage():
    from skimage.feature import hog
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(5)
    a = rng.normal(size=(3, 2, 24, 24))  # NCHW maps
    b = a + rng.normal(scale=0.7, size=a.shape)
    a[0, :, :4] = 0.0  # ties
    b[0, :, :3] = 0.0
    sims = similarities(a, b, "NCHW")
    sa, sb = a.sum(axis=1), b.sum(axis=1)
    aa, ab = np.abs(a).sum(axis=1), np.abs(b).sum(axis=1)
    for i in range(3):
        assert abs(sims["spearman"][i] - stats.spearmanr(sa[i].ravel(), sb[i].ravel())[0]) < 1e-12
        assert abs(sims["spearman_abs"][i] - stats.spearmanr(aa[i].ravel(), ab[i].ravel())[0]) < 1e-12
        na, nb = min_max(aa[i]), min_max(ab[i])
        ref = structural_similarity(
            na, nb, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
        # engine.metrics.ssim rounds its Gaussian window to float32 as pytorch_msssim does
        assert abs(sims["ssim"][i] - ref) < 1e-6
        ha = hog(na, orientations=9, pixels_per_cell=(8, 8), cells_per_block=(2, 2))
        hb = hog(nb, orientations=9, pixels_per_cell=(8, 8), cells_per_block=(2, 2))
        assert abs(sims["hog"][i] - stats.pearsonr(ha, hb)[0]) < 1e-12
    assert np.allclose(pearson(sa, sb), [np.corrcoef(sa[i].ravel(), sb[i].ravel())[0, 1] for i in range(3)])
    assert np.isnan(spearman(np.ones((1, 5)), np.arange(5.0)[None]))[0]
    with pytest.raises(ParameterError, match="HOG"):
        hog_features(np.zeros((1, 8, 8)))


def jpeg_by_hand(x01_chw: np.ndarray) -> np.ndarray:
    """The spec written out: [0, 1] CHW -> 8-bit HWC -> JPEG q75 (PIL) -> [0, 1] CHW."""
    u8 = np.round(np.clip(x01_chw.transpose(1, 2, 0), 0, 1) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="JPEG", quality=75)
    return np.asarray(Image.open(buf), np.float64).transpose(2, 0, 1) / 255.0


def test_stability_on_a_linear_model():
    model = LinearSoftmax((3, 16, 16), 4, layout="NCHW")
    x = images(model, n=2)
    target = np.array([1, 2])
    w = model.W[target].reshape(2, 3, 16, 16)
    jpeg = np.stack([jpeg_by_hand(img) for img in x]).astype(np.float32).astype(np.float64)
    # gradient × input of logits: the map is x ⊙ w_c, exactly
    raw = engine.evaluate(
        model,
        x,
        None,
        "stability",
        target=target,
        method="gradient_x_input",
        output="logit",
        normalise="none",
    )
    expected = -np.log((((x * w) - (jpeg * w)) ** 2).reshape(2, -1).mean(axis=1))
    assert np.allclose([r.score for r in raw], expected, rtol=1e-5)
    scaled = engine.evaluate(
        model, x, None, "stability", target=target, method="gradient_x_input", output="logit"
    )
    h0 = np.stack([min_max(np.abs(x[i] * w[i]).sum(axis=0)) for i in range(2)])
    h1 = np.stack([min_max(np.abs(jpeg[i] * w[i]).sum(axis=0)) for i in range(2)])
    assert np.allclose(
        [r.score for r in scaled], -np.log(((h0 - h1) ** 2).reshape(2, -1).mean(axis=1)), rtol=1e-4
    )
    assert scaled[0].higher_is_better

    # max-sensitivity: ‖(x' − x) ⊙ w‖ / ‖x ⊙ w‖ with x' the clipped noisy copies, drawn in order
    kw = dict(target=target, method="gradient_x_input", output="logit", radius=0.1, samples=5, seed=7)
    got = engine.evaluate(model, x, None, "max_sensitivity", chunk=2, **kw)
    rng = np.random.default_rng(7)
    ratios = []
    for _ in range(5):
        noisy = np.clip((x + rng.uniform(-0.1, 0.1, x.shape)).astype(np.float32), 0, 1).astype(np.float64)
        ratios.append(np.linalg.norm(((noisy - x) * w).reshape(2, -1), axis=1))
    expected = np.max(ratios, axis=0) / np.linalg.norm((x * w).reshape(2, -1), axis=1)
    assert np.allclose([r.score for r in got], expected, rtol=1e-5)
    same = engine.evaluate(model, x, None, "max_sensitivity", chunk=5, **kw)
    assert [r.score for r in same] == [r.score for r in got]  # seeded, chunk-independent bits
    flat = engine.evaluate(
        model, x, None, "max_sensitivity", target=target, method="saliency", output="logit"
    )
    assert all(r.score == 0.0 for r in flat)  # a linear model's logit gradient does not move


def test_completeness_on_analytic_models():
    model = LinearSoftmax((3, 8, 8), 4, layout="NCHW")
    x = images(model, n=3)
    f_x = model.score(x, [0, 1, 2], "probability")
    f_b = model.score(np.zeros_like(x), [0, 1, 2], "probability")
    zeros = engine.evaluate(model, x, np.zeros_like(x), "completeness", target=[0, 1, 2])
    assert np.allclose([r.score for r in zeros], np.abs(f_x - f_b), rtol=1e-5)
    assert np.allclose([r.extra["relative"] for r in zeros], 1.0, rtol=1e-5)

    # IG of a logit is exact on a linear model; IDGI sums exactly on any model
    ig = explain(model, x, "integrated_gradients", output="logit", steps=3)
    gaps = [r.score for r in engine.evaluate(model, x, ig, "completeness", output="logit")]
    assert max(gaps) < 1e-5 * np.abs(ig).sum()
    tanh = TanhNet((3, 8, 8), 4, layout="NCHW")
    for idgi in (False, True):
        attr, delta = explain(tanh, x, "integrated_gradients", steps=8, idgi=idgi, return_delta=True)
        got = engine.evaluate(tanh, x, attr, "completeness")
        assert np.allclose([r.score for r in got], np.abs(delta), rtol=1e-4, atol=1e-7)
        if idgi:
            assert max(r.extra["relative"] for r in got) < 1e-5


def test_postprocessing_against_pair():
    from saliency.core.visualization import VisualizeImageDiverging, VisualizeImageGrayscale

    rng = np.random.default_rng(2)
    m = rng.normal(size=(12, 10, 3))
    for p in (99, 95):
        assert np.allclose(pair_grayscale(m, p), VisualizeImageGrayscale(m, p), rtol=0, atol=1e-12)
        assert np.allclose(pair_diverging(m, p), VisualizeImageDiverging(m, p), rtol=0, atol=1e-12)
    chw = m.transpose(2, 0, 1)
    assert np.array_equal(pair_grayscale(chw, channel_axis=0), pair_grayscale(m))

    # AGI: 80th/99th percentile of 0..99 are 79.2 and 98.01 (linear interpolation), by hand
    h = rng.permutation(100).reshape(10, 10).astype(np.float64)
    agi = agi_clip(np.repeat(h[..., None], 3, axis=-1))
    assert np.allclose(agi, (np.clip(h, 79.2, 98.01) - 79.2) / (98.01 - 79.2), atol=1e-12)
    assert np.array_equal(igos_invert(np.array([[0.0, 1.0], [2.0, 4.0]])), [[1.0, 0.75], [0.5, 0.0]])
    assert np.array_equal(min_max(np.array([2.0, 4.0, 3.0])), [0.0, 1.0, 0.5])
    assert np.array_equal(pair_grayscale(np.zeros((4, 4, 3))), np.zeros((4, 4)))
    with pytest.raises(ParameterError, match="percentile"):
        pair_grayscale(m, 101)


@pytest.mark.parametrize("quadrature,idgi", [("left", False), ("trapezoid", False), ("right", True)])
def test_step_sensitivity_pools_shared_points(quadrature, idgi):
    model = TanhNet((3, 8, 8), 4, layout="NCHW")
    x = images(model, n=2)
    steps = (2, 4, 8, 16) if quadrature != "trapezoid" else (2, 3, 5, 9, 17)
    model.reset_counts()
    result = step_sensitivity(
        model,
        x,
        steps=steps,
        method_params={"quadrature": quadrature, "idgi": idgi},
        metrics={"completeness": {}},
        keep_maps=True,
    )
    assert model.calls["gradient"] == 1  # everything in one pooled call (chunk 32 >= the pool)
    assert model.rows["gradient"] == result.rows < result.rows_unpooled
    assert result.rows == 2 * 17  # the finest grid and both ends
    for s, n in enumerate(steps):
        ref, delta = explain(
            model, x, "integrated_gradients", steps=n, quadrature=quadrature, idgi=idgi, return_delta=True
        )
        assert rel_err(result.maps[s], ref) < 1e-6, n
        assert np.allclose(result.delta[s], delta, rtol=1e-6, atol=1e-9)
    # the metric computed afresh agrees with the gap from the pooled call
    assert np.allclose(result.scores["completeness"], np.abs(result.delta), rtol=1e-4, atol=1e-7)
    steps_axis, curve = result.curve("completeness")
    assert list(steps_axis) == list(steps) and curve.shape == (len(steps),)
    chunked = step_sensitivity(
        model, x, steps=steps, method_params={"quadrature": quadrature, "idgi": idgi}, chunk=3
    )
    assert np.allclose(chunked.delta, result.delta, rtol=1e-9, atol=1e-12)  # chunking: summation order only


def test_redraw_keeps_each_tensors_scale_and_is_seeded():
    from engine.initializers import Block

    rng = np.random.default_rng(0)
    values = {"w": rng.normal(0.3, 2.0, (200, 300)).astype(np.float32), "b": np.zeros(7, np.float32)}
    block = Block("fc", "Gemm", 4, ("w", "b"))
    for distribution in ("normal", "uniform"):
        new = redraw(values, block, distribution=distribution, seed=9)
        w = new["w"].astype(np.float64)
        assert new["w"].dtype == np.float32 and new["w"].shape == (200, 300)
        assert abs(w.mean() - 0.3) < 0.05 and abs(w.std() - 2.0) < 0.05, distribution
        assert np.abs(np.corrcoef(w.ravel(), values["w"].ravel())[0, 1]) < 0.02  # independent of the old
        assert np.array_equal(new["b"], values["b"])  # no spread: kept
        again = redraw(values, block, distribution=distribution, seed=9)
        assert np.array_equal(again["w"], new["w"])
        assert not np.array_equal(redraw(values, block, distribution=distribution, seed=10)["w"], new["w"])
    uniform = redraw(values, block, distribution="uniform", seed=9)["w"]
    assert uniform.max() <= 0.3 + np.sqrt(3) * values["w"].std() + 1e-3
    with pytest.raises(InputError, match="distribution"):
        redraw(values, block, distribution="glorot")


def test_blocks_take_the_bias_add_and_the_normalisation_after_them():
    from onnx import TensorProto, helper

    def init(name, *shape):
        return numpy_helper.from_array(np.ones(shape, np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "cw"], ["c"], name="conv"),
        helper.make_node("BatchNormalization", ["c", "g", "be", "mu", "var"], ["n"], name="bn"),
        helper.make_node("Flatten", ["n"], ["f"]),
        helper.make_node("MatMul", ["f", "mw"], ["m"], name="mm"),
        helper.make_node("Add", ["m", "mb"], ["a"]),
        helper.make_node("LayerNormalization", ["a", "ls", "lb"], ["y"], name="ln", axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
        [init("cw", 4, 2, 1, 1), init("g", 4), init("be", 4), init("mu", 4), init("var", 4)]
        + [init("mw", 36, 5), init("mb", 5), init("ls", 5), init("lb", 5)],
    )
    blocks = find_blocks(helper.make_model(graph))
    assert [(b.name, b.op, b.weights) for b in blocks] == [
        ("conv", "Conv", ("cw", "g", "be")),  # running mean and variance are statistics: kept
        ("mm", "MatMul", ("mw", "mb", "ls", "lb")),
    ]


def test_step_sensitivity_runs_other_path_methods_per_step_count():
    model = TanhNet((3, 8, 8), 4, layout="NCHW")
    x = images(model, n=2)
    result = step_sensitivity(
        model, x, method="blur_ig", steps=(3, 6), method_params={"max_sigma": 2.0}, keep_maps=True
    )
    for s, n in enumerate((3, 6)):
        assert np.array_equal(result.maps[s], explain(model, x, "blur_ig", steps=n, max_sigma=2.0))
    assert result.delta is None and result.scores == {}
    with pytest.raises(ParameterError, match="steps parameter"):
        step_sensitivity(model, x, method="saliency")


def test_redrawn_weights_do_not_replay_the_seed_the_model_was_built_with():
    """numpy's SeedSequence ignores trailing zeros (default_rng([0, 0]) is default_rng(0)): a
    model whose weights came from default_rng(0) must not get the same normals back."""
    from engine.initializers import Block, redraw

    w = np.random.default_rng(0).normal(size=(48, 3)).astype(np.float32)
    new = redraw({"W": w}, Block(name="m", op="MatMul", index=0, weights=("W",)), seed=0)["W"]
    z_old = (w - w.mean()) / w.std()
    z_new = (new - w.mean()) / w.std()
    assert abs(np.corrcoef(z_old.ravel(), z_new.ravel())[0, 1]) < 0.3
