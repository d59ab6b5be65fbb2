"""The same algorithm two ways (issue #9 §4): every line of tests/two_ways.py's table, run both
ways and compared in one layout (NCHW) within the line's tolerance of scale.

The references are the other way of computing the same thing: the Keras twin (tf2onnx graph,
NHWC) for the PyTorch twin, batch_size=1 for 1024, the builder's own gradient graph run by
onnxruntime-training for the lowered standard-ONNX graph, OpenVINO for onnxruntime. Gradient
models are compiled once per module (without the self-check: the "builder" way is that check,
done here independently) and shared by every Classifier of the same model file.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

import engine
from engine import errors
from engine.compile import builder, builder_graph, compile_model, head
from engine.methods import METHODS, method_parameters
from engine.methods import common as method_common
from engine.methods.common import output_scores
from tests.two_ways import BITS, CASES, ROUNDING, WAYS, Case

pytestmark = pytest.mark.slow

N_IMAGES = 2
# the backward rule / Grad-CAM tap each method asks the Classifier for (preloaded, compiled once)
GRADIENT_MODELS = {"guided_backprop": ("guided_backprop", None), "deconvnet": ("deconvnet", None)}
GRADIENT_MODELS["grad_cam"] = ("gradient", "auto")


@pytest.fixture(scope="module")
def files(tmp_path_factory, zoo_onnx):
    """``files(model) -> Path``: the twins exported once (TensorFlow imported only if asked)."""
    root = tmp_path_factory.mktemp("two_ways")
    made: dict[str, Path] = {}

    def get(model: str) -> Path:
        if model in ("twin", "twin_keras"):
            if model not in made:
                pytest.importorskip("tensorflow")
                from exporters import keras as keras_export
                from exporters import torch as torch_export
                from models import twins

                net, keras_model = twins.build_twins(seed=0)
                torch_export.export(net, root / "twin.onnx", input_shape=twins.INPUT_SHAPE_NCHW)
                keras_export.export(keras_model, root / "twin_keras.onnx")
                made["twin"], made["twin_keras"] = root / "twin.onnx", root / "twin_keras.onnx"
            return made[model]
        return zoo_onnx(model)

    return get


@pytest.fixture(scope="module")
def classifier(files):
    """``classifier(model, method, **load_kw)``: a Classifier with the gradient models the method
    needs preloaded; compiled models are shared across Classifiers of one file."""
    compiled: dict[tuple, bytes] = {}  # (model, rule, layer) -> gradient model bytes
    loaded: dict[tuple, engine.Classifier] = {}

    def get(model: str, method: str, **load_kw) -> engine.Classifier:
        path = files(model)
        key = (model, tuple(sorted(load_kw.items())))
        if key not in loaded:
            loaded[key] = engine.load(path, **load_kw)
        clf = loaded[key]
        for rule, layer in {("gradient", None), GRADIENT_MODELS.get(method, ("gradient", None))}:
            if (model, rule, layer) not in compiled:
                grad, _ = compile_model(path, rule=rule, layer=layer, self_check=False)
                compiled[model, rule, layer] = grad.SerializeToString()
            if (rule, layer) not in clf._compiled:
                clf._add_gradient_model(compiled[model, rule, layer])
        return clf

    return get


def _inputs(clf: engine.Classifier, n: int = N_IMAGES) -> tuple[np.ndarray, np.ndarray]:
    """Uniform images in the model's range, NCHW for a twin; targets that are not the top class."""
    shape = clf.input_shape if clf.layout != "NHWC" else (clf.input_shape[2], *clf.input_shape[:2])
    lo, hi = clf.input_range
    # not seed 0, the methods' default: default_rng(0).uniform in x's shape *is* the seeded
    # "uniform" baseline, and IG from x to itself is zero
    x = np.random.default_rng(7).uniform(lo, hi, (n, *shape)).astype(np.float32)
    return x, (np.arange(n) * 3 + 1) % clf.num_classes


def _nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def _nchw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _explain(clf, x_nchw, method, target, params):
    """The map in NCHW whatever the model's layout."""
    if clf.layout == "NHWC":
        return _nchw(engine.explain(clf, _nhwc(x_nchw), method, target=target, **params))
    return engine.explain(clf, x_nchw, method, target=target, **params)


def _row_independent(clf: engine.Classifier, x: np.ndarray, target: np.ndarray) -> bool:
    """The runtime computes each row the same whatever batch it comes in (BITS presumes it)."""
    one = np.concatenate([clf.gradient(x[i : i + 1], target[i : i + 1])[1] for i in range(len(x))])
    rows = np.concatenate([clf.predict(x[i : i + 1]) for i in range(len(x))])
    return np.array_equal(one, clf.gradient(x, target)[1]) and np.array_equal(rows, clf.predict(x))


def _ways(case: Case, classifier) -> tuple[np.ndarray, np.ndarray, float]:
    """(map A, map B, the case's scale), both maps NCHW (or as the model takes them)."""
    if case.ways == "builder":
        return _builder_way(case, classifier)
    model_a = case.model
    load_a, load_b = {}, {}
    if case.ways == "torch-keras":
        model_b = "twin_keras"
    elif case.ways == "chunked":
        model_b, load_a, load_b = case.model, {"batch_size": 1024}, {"batch_size": 1}
    elif case.ways == "openvino":
        pytest.importorskip("openvino")
        model_b, load_b = case.model, {"runtime": "openvino"}
    else:
        raise ValueError(f"unknown ways {case.ways!r}; known: {', '.join(WAYS)}")
    a, b = classifier(model_a, case.method, **load_a), classifier(model_b, case.method, **load_b)
    x, target = _inputs(a)
    map_a = _explain(a, x, case.method, target, case.params)
    if case.ways == "chunked":
        if case.tolerance == BITS and not _row_independent(b, x if b.layout != "NHWC" else _nhwc(x), target):
            warnings.warn(
                f"{case.id}: the runtime's rows depend on the batch: held to ROUNDING, not bits",
                stacklevel=2,
            )
            case = Case(**{**case.__dict__, "tolerance": ROUNDING})
        with pytest.MonkeyPatch.context() as mp:  # one example per perturbation chunk
            mp.setattr(method_common, "PERTURBATION_CHUNK_BYTES", int(x[0].nbytes))
            map_b = _explain(b, x, case.method, target, case.params)
    else:
        map_b = _explain(b, x, case.method, target, case.params)
    if case.scale == "score":
        xa = _nhwc(x) if a.layout == "NHWC" else x
        scale = float(np.abs(output_scores(a.predict(xa), target, "probability")).max())
    else:
        scale = float(np.abs(map_a).max())
    return map_a, map_b, scale


def _static_batch(path: Path, batch: int) -> onnx.ModelProto:
    """The model with its batch axis fixed: the builder's runtime crashes on AveragePoolGrad with a
    symbolic batch (engine/compile/selfcheck.py builds its reference the same way)."""
    model = onnx.load(path)
    for vi in [*model.graph.input, *model.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if len(dims) and not dims[0].HasField("dim_value"):
            dims[0].dim_value = batch
    del model.graph.value_info[:]
    return model


def _builder_way(case: Case, classifier) -> tuple[np.ndarray, np.ndarray, float]:
    rule, output = case.params.get("rule", "gradient"), case.params.get("output", "probability")
    clf = classifier(case.model, rule)  # the rule's gradient model (GRADIENT_MODELS is keyed alike)
    x, target = _inputs(clf, 3)
    scores, lowered = clf.gradient(x, target, output=output, rule=rule)
    graph, mf = builder_graph(_static_batch(clf.path, len(x)), rule=rule)
    info = clf._compiled[(rule, None)][1]
    feeds = {
        mf.input_name: x,
        head.CLASS_WEIGHTS: np.eye(clf.num_classes, dtype=np.float32)[target],
        head.OUTPUT_MIX: np.eye(3, dtype=np.float32)[head.OUTPUT_INDEX[output]],
    }
    with tempfile.TemporaryDirectory(prefix="two-ways-") as tmp:
        t = Path(tmp)
        onnx.save(graph, t / "builder.onnx")
        np.savez(t / "feeds.npz", **feeds)
        outputs = [info.scores, info.input_gradient]
        builder.call(
            {
                "op": "run",
                "model": str(t / "builder.onnx"),
                "feeds": str(t / "feeds.npz"),
                "outputs": outputs,
                "result": str(t / "result.npz"),
            }
        )
        reference = dict(np.load(t / "result.npz"))
    ref_scores, ref_grads = reference[info.scores], reference[info.input_gradient]
    assert np.abs(ref_scores - scores).max() <= ROUNDING * np.abs(ref_scores).max()
    return ref_grads, lowered, float(np.abs(ref_grads).max())


def _param(case: Case):
    marks = []
    if case.method not in METHODS and case.method != "gradient":
        marks.append(pytest.mark.skip(reason=f"{case.method} is not registered in this checkout"))
    if case.xfail:
        raises = getattr(errors, case.raises) if case.raises else None
        marks.append(pytest.mark.xfail(reason=case.xfail, strict=True, raises=raises))
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_same_algorithm_two_ways(case: Case, classifier, record_property):
    map_a, map_b, scale = _ways(case, classifier)
    assert map_a.shape == map_b.shape and map_a.dtype == map_b.dtype == np.float32
    assert np.isfinite(map_a).all() and scale > 0, "a zero or non-finite map cannot tell the ways apart"
    err = float(np.abs(map_a.astype(np.float64) - map_b).max())
    record_property("relative_error", err / scale)  # the measured figure (pytest --junitxml)
    if case.tolerance == BITS:
        assert np.array_equal(map_a, map_b), f"{case.id}: not bit-identical (max |A - B| {err:.3g})"
    else:
        assert err <= case.tolerance * scale, (
            f"{case.id}: max |A - B| = {err:.3g} = {err / scale:.3g} of scale {scale:.3g} "
            f"(tolerance {case.tolerance:.3g}; {WAYS[case.ways][0]} vs {WAYS[case.ways][1]})"
        )


def test_every_registered_method_is_compared_between_the_twins():
    """A new method in engine.methods.METHODS needs its line in tests/two_ways.py."""
    twinned = {c.method for c in CASES if c.ways == "torch-keras"}
    assert set(METHODS) <= twinned, f"add a torch-keras case for {sorted(set(METHODS) - twinned)}"


def test_the_table_is_well_formed():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), "two cases with the same id"
    for c in CASES:
        assert c.ways in WAYS and c.scale in ("map", "score") and c.tolerance >= 0, c
        assert (c.method == "gradient") == (c.ways == "builder"), c
        if c.method in METHODS:  # a misspelt parameter would otherwise fail as a TypeError
            assert set(c.params) <= set(method_parameters(c.method)), c
        assert c.raises is None or issubclass(getattr(errors, c.raises), Exception), c
