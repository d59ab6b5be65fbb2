"""Exporters against their frameworks: every ONNX file must reproduce PyTorch / Keras logits.

Tolerances are relative to the logit scale: ``max|onnx - framework| <= RTOL * max(1, max|logits|)``.
Measured on this suite: <= 6e-7 absolute at logit scales 0.1-1.1 (zoo, twins), 6e-6 at scale 11
(EfficientNet-Lite0); RTOL = 1e-5 leaves an order of magnitude of headroom.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from engine import metadata
from exporters import ExportParityError, default_tolerance
from exporters import torch as torch_exporter
from models import zoo

RTOL = 1e-5
KERAS_STYLES = ("functional", "sequential", "subclassed")


def run_onnx(path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": x})[0]


def run_torch(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def assert_logits_close(got: np.ndarray, expected: np.ndarray, rtol: float = RTOL) -> float:
    """Assert ``max|got - expected| <= rtol * max(1, max|expected|)``; return the difference."""
    assert got.shape == expected.shape
    scale = max(1.0, float(np.abs(expected).max()))
    diff = float(np.abs(got - expected).max())
    assert diff <= rtol * scale, f"max abs diff {diff:.3g} > {rtol} * logit scale {scale:.3g}"
    return diff


def uniform(shape, low=0.0, high=1.0, seed=123) -> np.ndarray:
    return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


# --- PyTorch ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_zoo_export_matches_torch_at_other_batch_sizes(name, zoo_onnx):
    path = zoo_onnx(name)
    module, shape = zoo.build(name), zoo.ZOO[name][1]
    low, high = zoo.INPUT_RANGE.get(name, (0.0, 1.0))
    model = onnx.load(path)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert model.ir_version <= 10
    # Traced at batch 2, checked at 3 by the exporter; here 1 and 5.
    for batch in (1, 5):
        x = uniform((batch, *shape), low, high, seed=batch)
        assert_logits_close(run_onnx(path, x), run_torch(module, x))


@pytest.mark.parametrize(
    "name, layout, input_range",
    [("vgg_block", "NCHW", (0.0, 1.0)), ("mlp", None, (0.0, 1.0)), ("text_cnn", None, (-1.0, 1.0))],
)
def test_torch_metadata_round_trips(name, layout, input_range, zoo_onnx):
    model = onnx.load(zoo_onnx(name))
    info = metadata.read(model)
    assert info.layout == layout
    assert info.input_range == input_range
    assert info.source_framework == "torch"
    assert info.source_framework_version == torch.__version__
    assert info.labels is None and info.preprocessing == {}
    assert 0.0 <= info.export_max_abs_diff <= 1e-4
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]


def test_normalisation_is_baked_into_the_graph(tmp_path):
    module = zoo.vgg_block(seed=1)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    labels = [f"class {i}" for i in range(zoo.NUM_CLASSES)]
    report = torch_exporter.export(
        module, tmp_path / "vgg.onnx", input_shape=(3, 32, 32), mean=mean, std=std, labels=labels
    )
    x = uniform((4, 3, 32, 32))
    normalised = (x - np.reshape(mean, (1, 3, 1, 1))) / np.reshape(std, (1, 3, 1, 1))
    expected = run_torch(module, normalised.astype(np.float32))
    got = run_onnx(report.path, x)
    assert_logits_close(got, expected)
    # Normalisation changes the logits a lot, so the comparison above is not vacuous.
    assert np.abs(run_torch(module, x) - expected).max() > 100 * RTOL

    info = metadata.read(onnx.load(report.path))
    assert info.preprocessing == {"mean": list(mean), "std": list(std), "in_graph": True}
    assert info.labels == labels
    assert info.input_range == (0.0, 1.0)
    assert report.num_classes == zoo.NUM_CLASSES and report.max_abs_diff <= report.tolerance


def _batchnorm_nodes(path) -> int:
    return sum(node.op_type == "BatchNormalization" for node in onnx.load(path).graph.node)


def test_keep_batchnorm_leaves_batchnorm_nodes(tmp_path, zoo_onnx):
    module = zoo.resnet_basic()
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules())
    assert _batchnorm_nodes(zoo_onnx("resnet_basic")) == n_bn  # exported with keep_batchnorm
    folded = torch_exporter.export(module, tmp_path / "folded.onnx", input_shape=(3, 32, 32))
    assert _batchnorm_nodes(folded.path) == 0  # default: folded into the convolutions
    x = uniform((3, 3, 32, 32))
    assert_logits_close(run_onnx(folded.path, x), run_torch(module, x))


def test_export_restores_training_mode(tmp_path):
    module = zoo.mlp().train()
    torch_exporter.export(module, tmp_path / "mlp.onnx", input_shape=(16,))
    assert module.training


def test_tolerance_default_is_relative_to_logit_scale():
    assert default_tolerance(np.array([[0.1, -0.5]]), 1e-4) == pytest.approx(1e-4)
    assert default_tolerance(np.array([[3.0, -20.0]]), 1e-4) == pytest.approx(2e-3)


# --- Refusals --------------------------------------------------------------------------------


class FrozenScalar(torch.nn.Module):
    """A classic tracing bug: a data-dependent Python float is frozen into the traced graph, so
    the ONNX model scales by the tracing batch's sum while PyTorch uses each batch's own."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(x) * float(x.sum())


def _parse_difference(message: str) -> tuple[float, float]:
    match = re.search(r"max abs difference ([0-9.e+-]+) > tolerance ([0-9.e+-]+)", message)
    assert match, message
    return float(match.group(1)), float(match.group(2))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_trace_that_differs_from_eager_is_refused_and_nothing_written(tmp_path):
    with pytest.raises(ExportParityError) as error:
        torch_exporter.export(FrozenScalar(), tmp_path / "frozen.onnx", input_shape=(16,))
    diff, tolerance = _parse_difference(str(error.value))
    assert diff > 10 * tolerance
    assert os.listdir(tmp_path) == []  # no model, no temporary file


def test_refusal_states_the_measured_difference_and_keeps_the_old_file(tmp_path, monkeypatch):
    from exporters import _common

    path = tmp_path / "mlp.onnx"
    path.write_bytes(b"previous model")
    real_run = _common._run_onnx
    monkeypatch.setattr(_common, "_run_onnx", lambda model, x: real_run(model, x) + 0.5)
    with pytest.raises(ExportParityError) as error:
        torch_exporter.export(zoo.mlp(), path, input_shape=(16,))
    diff, tolerance = _parse_difference(str(error.value))
    assert diff == pytest.approx(0.5, abs=1e-6)
    assert tolerance == pytest.approx(1e-4)  # logits of the mlp are below 1: rtol * 1
    assert path.read_bytes() == b"previous model"
    assert sorted(os.listdir(tmp_path)) == ["mlp.onnx"]


def test_wrong_number_of_labels_is_refused(tmp_path):
    with pytest.raises(ValueError, match="3 labels given for a model with 10 classes"):
        torch_exporter.export(zoo.mlp(), tmp_path / "m.onnx", input_shape=(16,), labels=["a", "b", "c"])
    assert os.listdir(tmp_path) == []


def test_importing_exporters_imports_no_framework():
    code = (
        "import sys, exporters, exporters.torch, exporters.keras; "
        "bad = [m for m in ('torch', 'tensorflow', 'keras') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- Keras -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def twins():
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    from models import twins

    return twins


@pytest.fixture(scope="module")
def keras_exports(twins, tmp_path_factory):
    """{style: (keras_model, ExportReport)} plus the torch twin's export under "torch"."""
    from exporters import keras as keras_exporter

    folder = tmp_path_factory.mktemp("keras")
    torch_module = twins.build_torch_twin(seed=0)
    exports = {
        "torch": (
            torch_module,
            torch_exporter.export(torch_module, folder / "torch.onnx", input_shape=twins.INPUT_SHAPE_NCHW),
        )
    }
    for style in KERAS_STYLES:
        model = twins.build_keras_twin(torch_module, style)
        # Subclassed models declare no inputs; the others must not need input_shape.
        shape = twins.INPUT_SHAPE_NHWC if style == "subclassed" else None
        report = keras_exporter.export(model, folder / f"{style}.onnx", input_shape=shape)
        exports[style] = (model, report)
    return exports


@pytest.mark.parametrize("style", KERAS_STYLES)
def test_keras_export_matches_keras(style, keras_exports, twins):
    model, report = keras_exports[style]
    x = uniform((5, *twins.INPUT_SHAPE_NHWC))
    expected = np.asarray(model(x, training=False))
    assert_logits_close(run_onnx(report.path, x), expected)

    onnx_model = onnx.load(report.path)
    graph = onnx_model.graph
    assert [v.name for v in graph.input] == ["input"] and [v.name for v in graph.output] == ["logits"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert onnx_model.ir_version <= 10
    info = metadata.read(onnx_model)
    assert info.layout == "NHWC" and info.input_range == (0.0, 1.0)
    assert info.source_framework == "keras"
    assert report.max_abs_diff <= report.tolerance and report.num_classes == twins.NUM_CLASSES


@pytest.mark.parametrize("style", KERAS_STYLES)
def test_twins_agree_after_layout_transpose(style, keras_exports, twins):
    torch_module, torch_report = keras_exports["torch"]
    _, keras_report = keras_exports[style]
    x = uniform((4, *twins.INPUT_SHAPE_NCHW), seed=7)
    from_torch = run_onnx(torch_report.path, x)
    from_keras = run_onnx(keras_report.path, np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
    assert_logits_close(from_keras, from_torch)
    assert_logits_close(from_torch, run_torch(torch_module, x))


def test_keras_normalisation_is_baked_into_the_graph(twins, tmp_path):
    from exporters import keras as keras_exporter

    _, model = twins.build_twins(seed=2)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    report = keras_exporter.export(model, tmp_path / "k.onnx", mean=mean, std=std)
    x = uniform((3, *twins.INPUT_SHAPE_NHWC))
    expected = np.asarray(model((x - np.float32(mean)) / np.float32(std), training=False))
    assert_logits_close(run_onnx(report.path, x), expected)
    assert metadata.read(onnx.load(report.path)).preprocessing["in_graph"] is True


def test_keras_normalization_layer_constants_become_initializers(twins, tmp_path):
    """A Keras Normalization layer's mean and variance are captured tensors, which tf2onnx makes
    extra graph inputs (EfficientNetB0, ConvNeXtTiny): they are bound as initializers, and the
    symbolic class dimension becomes the measured one."""
    import keras

    from exporters import keras as keras_exporter

    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    h = keras.layers.Normalization(mean=[0.5, 0.4, 0.3], variance=[0.04, 0.05, 0.09])(inp)
    h = keras.layers.Conv2D(4, 3, activation="relu")(h)
    out = keras.layers.Dense(5)(keras.layers.GlobalAveragePooling2D()(h))
    model = keras.Model(inp, out)
    report = keras_exporter.export(model, tmp_path / "n.onnx")
    graph = onnx.load(report.path).graph
    assert [i.name for i in graph.input] == ["input"]
    assert graph.output[0].type.tensor_type.shape.dim[1].dim_value == 5
    x = uniform((3, 8, 8, 3))
    assert_logits_close(run_onnx(report.path, x), np.asarray(model(x, training=False)))


def test_keras_subclassed_without_input_shape_is_refused(twins, tmp_path):
    from exporters import keras as keras_exporter

    torch_module = twins.build_torch_twin()
    model = twins.build_keras_twin(torch_module, "subclassed")
    with pytest.raises(ValueError, match="pass input_shape"):
        keras_exporter.export(model, tmp_path / "k.onnx")
    assert os.listdir(tmp_path) == []


# --- EfficientNet-Lite0 ----------------------------------------------------------------------


def test_efficientnet_lite0_export_matches_torch_and_sees_a_cat_and_an_espresso(tmp_path):
    from models import efficientnet, images

    report = efficientnet.export_efficientnet_lite0(tmp_path / "effnet.onnx")
    x, names = images.sample_images(224, names=("chelsea", "coffee"))
    module = efficientnet.load_efficientnet_lite0()
    expected = run_torch(module, ((x - 0.5) / 0.5).astype(np.float32))
    logits = run_onnx(report.path, x)
    assert_logits_close(logits, expected)

    info = metadata.read(onnx.load(report.path))
    assert len(info.labels) == 1000 and info.labels[281] == "tabby"
    assert info.preprocessing["mean"] == [0.5, 0.5, 0.5]
    top1 = dict(zip(names, logits.argmax(axis=1).tolist(), strict=True))
    # ImageNet 281-285: tabby, tiger cat, Persian, Siamese, Egyptian cat.
    assert 281 <= top1["chelsea"] <= 285, info.labels[top1["chelsea"]]
    # 967 espresso, 968 cup, 504 coffee mug.
    assert top1["coffee"] in (967, 968, 504), info.labels[top1["coffee"]]
