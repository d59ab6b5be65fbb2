"""Compile once, explain on any runtime: the portable gradient model on onnxruntime, OpenVINO's
CPU plugin and onnx's reference evaluator, against torch autograd; onnxruntime's tuned rewrites
applied at load only, bit-identical to the portable graph there.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import engine
from engine.compile import CompiledInfo, compile_to_file, head
from engine.compile.tuning import tune_for_onnxruntime
from models import zoo
from tests.gradcheck import relative_error, torch_gradient

# ReLU6 masks and a GlobalAveragePool broadcast (both tuned rewrites fire); ReLU masks with
# projection shortcuts and BatchNorm; a transformer (no tuned rewrite at all).
MODELS = ["relu6_cnn", "mobilenetv2_block", "resnet_basic", "tiny_vit_erf"]
# The transformer runs on OpenVINO too (tests/test_coverage_ops.py checks it against torch).
OPENVINO_MODELS = MODELS[:3]


def _inputs(name: str, n: int = 3) -> np.ndarray:
    lo, hi = zoo.INPUT_RANGE.get(name, (0.0, 1.0))
    return np.random.default_rng(7).uniform(lo, hi, (n, *zoo.ZOO[name][1])).astype(np.float32)


@pytest.mark.parametrize("name", OPENVINO_MODELS)
def test_the_portable_gradient_model_is_exact_on_openvino_and_onnxruntime(name, zoo_onnx, tmp_path):
    pytest.importorskip("openvino")
    path = zoo_onnx(name)
    grad_path = tmp_path / "grad.onnx"
    compile_to_file(path, grad_path)
    info = CompiledInfo.from_model(onnx.load(grad_path))
    assert info.tuned == {}  # what compile writes is the portable graph
    x = _inputs(name)
    target = np.arange(len(x)) % 3
    want = torch_gradient(zoo.build(name), x, target, output="probability")[1]
    got = {}
    for runtime in ("onnxruntime", "openvino"):
        clf = engine.load(path, gradient_model=grad_path, runtime=runtime)
        scores, grads = clf.gradient(x, target, output="probability")
        got[runtime] = grads
        assert relative_error(grads, want) < 1e-5, (runtime, relative_error(grads, want))
        np.testing.assert_allclose(clf.predict(x), engine.load(path).predict(x), rtol=1e-5, atol=1e-5)
    assert engine.load(path, runtime="openvino").providers == ["OpenVINO:CPU"]


@pytest.mark.parametrize("name", MODELS)
def test_onnxruntime_rewrites_are_applied_at_load_and_change_no_bit(name, zoo_onnx, tmp_path):
    import onnxruntime as ort

    path = zoo_onnx(name)
    grad_path = tmp_path / "grad.onnx"
    compile_to_file(path, grad_path, self_check=False)
    portable = grad_path.read_bytes()
    tuned = tune_for_onnxruntime(portable)
    info = CompiledInfo.from_model(onnx.load_from_string(tuned))
    assert info.tuned["runtime"] == "onnxruntime"
    if name in ("relu6_cnn", "mobilenetv2_block", "resnet_basic"):
        assert info.tuned["conv_masks"] > 0
    if name == "relu6_cnn":
        assert info.tuned["upsample_broadcasts"] == 1
    assert tune_for_onnxruntime(tuned) == tuned  # idempotent
    x = _inputs(name, 4)
    feeds = {
        info.input: x,
        head.CLASS_WEIGHTS: np.eye(info.num_classes, dtype=np.float32)[np.arange(4) % info.num_classes],
        head.OUTPUT_MIX: np.array([0.2, 0.5, 0.3], np.float32),
    }
    outs = [info.scores, info.input_gradient]
    a = ort.InferenceSession(portable, providers=["CPUExecutionProvider"]).run(outs, feeds)
    b = ort.InferenceSession(tuned, providers=["CPUExecutionProvider"]).run(outs, feeds)
    for u, v in zip(a, b):
        assert np.array_equal(u, v)


def test_the_reference_evaluator_runs_the_portable_graph(zoo_onnx, tmp_path):
    from onnx.reference import ReferenceEvaluator

    name = "relu6_cnn"
    path = zoo_onnx(name)
    grad_path = tmp_path / "grad.onnx"
    compile_to_file(path, grad_path, self_check=False)
    info = CompiledInfo.from_model(onnx.load(grad_path))
    x = _inputs(name, 2)
    target = np.array([1, 4])
    feeds = {
        info.input: x,
        head.CLASS_WEIGHTS: np.eye(info.num_classes, dtype=np.float32)[target],
        head.OUTPUT_MIX: np.eye(3, dtype=np.float32)[head.OUTPUT_INDEX["probability"]],
    }
    (grads,) = ReferenceEvaluator(str(grad_path)).run([info.input_gradient], feeds)
    want = torch_gradient(zoo.build(name), x, target, output="probability")[1]
    assert relative_error(grads, want) < 1e-5


def test_unknown_runtime_is_refused(zoo_onnx):
    with pytest.raises(engine.errors.InputError, match="unknown runtime 'tvm'"):
        engine.load(zoo_onnx("relu6_cnn"), runtime="tvm")


def test_a_graph_openvino_cannot_read_is_a_clear_error(tmp_path):
    """OpenVINO needs reduction axes of static length: a ReduceSum whose axes are found at run
    time (NonZero) is refused at load, and the Classifier says which runtime failed."""
    pytest.importorskip("openvino")
    from onnx import helper, numpy_helper

    from tests.test_coverage import onnx_classifier

    nodes = [
        helper.make_node("Shape", ["input"], ["shape"]),
        helper.make_node("Equal", ["shape", "four"], ["is4"]),
        helper.make_node("NonZero", ["is4"], ["nz"]),
        helper.make_node("Reshape", ["nz", "minus_one"], ["axes"]),
        helper.make_node("ReduceSum", ["input", "axes"], ["act"], keepdims=1),
    ]
    inits = [
        numpy_helper.from_array(np.array(4, np.int64), "four"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
    ]
    path, _ = onnx_classifier(tmp_path, nodes, (3, 4), inits=inits, features=3)
    clf = engine.load(path, runtime="openvino")
    with pytest.raises(engine.errors.RuntimeFailure, match=r"openvino failed to load .*ReduceSum"):
        clf.predict(np.zeros((1, 3, 4), np.float32))
