"""Patterns of real architectures the compiler used to refuse (issue #9 §1), each as a tiny model
checked against torch autograd. docs/compiler-coverage.md explains each rewrite."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

import engine
from tests.gradcheck import check_module, relative_error, torch_gradient
from tests.test_lowering import Head, Lambda


def _check(body, shape, tmp_path, **kw):
    torch.manual_seed(3)
    module = Head(body, shape)
    return check_module(module, shape, tmp_path, **kw)


def onnx_classifier(tmp_path, nodes, shape, *, inits=(), opset=17, batch="batch", seed=0):
    """input -> ``nodes`` (ending in tensor "act") -> Flatten -> MatMul to 4 classes, hand-built for
    ops torch never exports. Returns the path and the weight of the final MatMul."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    fc = rng.normal(size=(n, 4)).astype(np.float32)
    graph = helper.make_graph(
        [
            *nodes,
            helper.make_node("Flatten", ["act"], ["flat"]),
            helper.make_node("MatMul", ["flat", "fc"], ["logits"]),
        ],
        "case",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, *shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 4])],
        [numpy_helper.from_array(fc, "fc"), *inits],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    path = tmp_path / "case.onnx"
    onnx.save(model, path)
    return path, torch.tensor(fc)


def check_onnx(path, fc, act, shape, *, batch=3, low=-3.0, high=3.0, rtol=1e-5, seed=1):
    """Gradients of the hand-built classifier against torch autograd of ``act`` -> flatten -> fc."""
    clf = engine.load(path, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    x = rng.uniform(low, high, size=(batch, *shape)).astype(np.float32)
    target = rng.integers(0, 4, batch)
    ref = lambda t: act(t).flatten(1) @ fc  # noqa: E731
    for output in ("logit", "probability"):
        scores, grads = clf.gradient(x, target, output=output)
        ref_scores, ref_grads = torch_gradient(ref, x, target, output)
        assert relative_error(scores, ref_scores) <= 1e-5, output
        assert relative_error(grads, ref_grads) <= rtol, output
    return clf


def _info(clf):
    return clf._compiled[("gradient", None)][1]


# ----------------------------------------------------------------------------------- DivGrad
# The builder emits com.microsoft::DivGrad when both operands of a Div need a gradient (softsign,
# normalisations by a norm of the input, as in edgenext, convnextv2's GRN, xcit).
DIV_CASES = [
    pytest.param(lambda x: x / (1 + x * x), (5,), id="div-same-shape"),
    pytest.param(lambda x: x / (1 + x.abs().sum(-1, keepdim=True)), (5,), id="div-divisor-broadcast"),
    pytest.param(lambda x: x.sum(-1, keepdim=True) / (1 + x.abs()), (3, 4), id="div-dividend-broadcast"),
    pytest.param(lambda x: x / x.norm(dim=1, keepdim=True).clamp(min=1e-3), (3, 4, 4), id="div-grn-like"),
]


@pytest.mark.parametrize("fn,shape", DIV_CASES)
def test_div_grad_matches_torch(fn, shape, tmp_path):
    clf, _ = _check(Lambda(fn), shape, tmp_path)
    assert "DivGrad" in _info(clf).lowered_ops


def test_div_grad_static_shapes(tmp_path):
    """A fixed batch makes every shape static: the reductions take constant axes."""
    nodes = [
        helper.make_node("Abs", ["input"], ["ab"]),
        helper.make_node("ReduceSum", ["ab", "axes"], ["s"], keepdims=1),
        helper.make_node("Add", ["s", "one"], ["den"]),
        helper.make_node("Div", ["input", "den"], ["act"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([2], np.int64), "axes"),
        numpy_helper.from_array(np.float32(1), "one"),
    ]
    path, fc = onnx_classifier(tmp_path, nodes, (3, 4), inits=inits, batch=3)
    clf = check_onnx(path, fc, lambda t: t / (1 + t.abs().sum(2, keepdim=True)), (3, 4))
    assert "DivGrad" in _info(clf).lowered_ops
    assert _info(clf).self_check["status"] == "passed"
