"""Gradient parity for every zoo model and every target output: the lowered graph against torch
autograd (relative error <= 1e-4 of the gradient's scale) and against the builder's own graph
(<= 1e-6 relative, the compiler's self-check). Keras exports against tf.GradientTape, and the
PyTorch/Keras twins against each other after the layout transpose."""

import numpy as np
import pytest

import engine
from engine.compile import CompiledInfo
from models.zoo import INPUT_RANGE, ZOO, build
from tests.gradcheck import relative_error, torch_gradient

CPU = ["CPUExecutionProvider"]
OUTPUTS = ("logit", "probability", "log_probability")


def _inputs(clf, name, n=3, seed=0):
    lo, hi = INPUT_RANGE.get(name, clf.input_range)
    rng = np.random.default_rng(seed)
    x = rng.uniform(lo, hi, size=(n, *clf.input_shape)).astype(np.float32)
    return x, rng.integers(0, clf.num_classes, n)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_gradients_match_torch_and_builder(name, zoo_onnx):
    clf = engine.load(zoo_onnx(name), providers=CPU)
    module = build(name)
    x, target = _inputs(clf, name)
    for output in OUTPUTS:
        scores, grads = clf.gradient(x, target, output=output)
        ref_scores, ref_grads = torch_gradient(module, x, target, output)
        assert relative_error(scores, ref_scores) <= 1e-5, output
        err = relative_error(grads, ref_grads)
        assert err <= 1e-4, f"{name} {output}: relative error {err:.3g} vs torch autograd"
    info: CompiledInfo = clf._compiled[("gradient", None)][1]
    check = info.self_check
    assert check["status"] == "passed", check
    g = check[info.input_gradient]
    assert g["max_abs_error"] <= 1e-6 * g["scale"], g
    assert {
        n.domain for n in __import__("onnx").load_from_string(clf._compiled[("gradient", None)][0]).graph.node
    } <= {"", "ai.onnx"}


def _keras_gradient(model, x, target, output):
    import tensorflow as tf

    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        z = model(xt, training=False)
        f = {"logit": z, "probability": tf.nn.softmax(z), "log_probability": tf.nn.log_softmax(z)}[output]
        s = tf.gather(f, target, axis=1, batch_dims=1)
        loss = tf.reduce_sum(s)
    return s.numpy(), tape.gradient(loss, xt).numpy()


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    from exporters import keras as keras_export
    from exporters import torch as torch_export
    from models.twins import build_twins

    folder = tmp_path_factory.mktemp("twins")
    torch_model, keras_model = build_twins(seed=0)
    shape = tuple(keras_model.inputs[0].shape[1:])
    torch_export.export(torch_model, folder / "torch.onnx", input_shape=(shape[2], shape[0], shape[1]))
    keras_export.export(keras_model, folder / "keras.onnx")
    return torch_model, keras_model, folder / "torch.onnx", folder / "keras.onnx"


def test_keras_export_gradients_match_gradient_tape(twins):
    _, keras_model, _, keras_path = twins
    clf = engine.load(keras_path, providers=CPU)
    assert clf.layout == "NHWC"
    x, target = _inputs(clf, "twin", n=4)
    for output in OUTPUTS:
        scores, grads = clf.gradient(x, target, output=output)
        ref_scores, ref_grads = _keras_gradient(keras_model, x, target, output)
        assert relative_error(scores, ref_scores) <= 1e-5
        assert relative_error(grads, ref_grads) <= 1e-4, output


def test_twins_agree_after_layout_transpose(twins):
    _, _, torch_path, keras_path = twins
    pt = engine.load(torch_path, providers=CPU)
    tf_ = engine.load(keras_path, providers=CPU)
    assert pt.layout == "NCHW" and tf_.layout == "NHWC"
    x_nchw, target = _inputs(pt, "twin", n=4, seed=3)
    x_nhwc = x_nchw.transpose(0, 2, 3, 1).copy()
    assert relative_error(tf_.predict(x_nhwc), pt.predict(x_nchw)) <= 1e-6
    for output in OUTPUTS:
        _, g_pt = pt.gradient(x_nchw, target, output=output)
        _, g_tf = tf_.gradient(x_nhwc, target, output=output)
        assert relative_error(g_tf.transpose(0, 3, 1, 2), g_pt) <= 1e-6, output


def test_twins_grad_cam_agrees(twins):
    """Same network from two frameworks: the automatic Grad-CAM layer is found in both graphs
    (tf2onnx wraps its convolutions in transposes) and the maps agree after the layout transpose."""
    _, _, torch_path, keras_path = twins
    pt = engine.load(torch_path, providers=CPU)
    tf_ = engine.load(keras_path, providers=CPU)
    x_nchw, target = _inputs(pt, "twin", n=3, seed=4)
    x_nhwc = x_nchw.transpose(0, 2, 3, 1).copy()
    _, act_pt, grad_pt = pt.layer_gradient(x_nchw, target)
    _, act_tf, grad_tf = tf_.layer_gradient(x_nhwc, target)
    assert relative_error(act_tf.transpose(0, 3, 1, 2), act_pt) <= 1e-6
    assert relative_error(grad_tf.transpose(0, 3, 1, 2), grad_pt) <= 1e-5
    cam_pt = engine.explain(pt, x_nchw, "grad_cam", target=target)
    cam_tf = engine.explain(tf_, x_nhwc, "grad_cam", target=target)
    assert relative_error(cam_tf.transpose(0, 3, 1, 2), cam_pt) <= 1e-5
