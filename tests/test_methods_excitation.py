"""Excitation backprop (MWP, c-MWP) against a torch implementation of the paper written here.

The reference passes probabilities, not gradients, through torch's autograd: every layer is a
``torch.autograd.Function`` whose backward is the MWP rule of Zhang et al. (2016): for a linear
layer P_in = a+ · W+ᵀ (P_out / z+) with z+ = W+ a+ (Conv2d, Linear, average pooling; BatchNorm
folded into the convolution first), the residual Add splits P by contribution, ReLU/ReLU6 pass
P unchanged and max pooling routes it to the winner (its ordinary gradient). The contrastive map
subtracts the dual unit's P at an intermediate contrast layer, as the paper does, and carries the
difference down. It runs in float64; the compiled graph in float32.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import engine
from engine.errors import InputError, ParameterError, UnsupportedModelError
from engine.methods import explain
from models.zoo import BasicBlock, InvertedResidual, build, export_zoo_model
from tests.gradcheck import export, relative_error

TOL = 1e-5


# ------------------------------------------------------------------ the torch reference
class _Linear(torch.autograd.Function):
    """Forward: ``full(x)``; backward: P_in = x+ · positive(x+)ᵀ (P_out / z+), 0 where z+ = 0."""

    @staticmethod
    def forward(ctx, x, full, positive):
        ctx.save_for_backward(x)
        ctx.positive = positive
        return full(x)

    @staticmethod
    def backward(ctx, p_out):
        (x,) = ctx.saved_tensors
        xp = x.clamp(min=0).detach().requires_grad_(True)
        with torch.enable_grad():
            z = ctx.positive(xp)
        ratio = torch.where(z == 0, torch.zeros_like(z), p_out / z)
        (back,) = torch.autograd.grad(z, xp, ratio)
        return xp.detach() * back, None, None


class _Pass(torch.autograd.Function):
    """ReLU / ReLU6: P at the output is P at the pre-activation neuron."""

    @staticmethod
    def forward(ctx, x, fn):
        return fn(x)

    @staticmethod
    def backward(ctx, p_out):
        return p_out, None


class _Add(torch.autograd.Function):
    """u + v as a positive linear layer with weights 1: P split by contribution."""

    @staticmethod
    def forward(ctx, u, v):
        ctx.save_for_backward(u, v)
        return u + v

    @staticmethod
    def backward(ctx, p_out):
        u, v = (t.clamp(min=0) for t in ctx.saved_tensors)
        z = u + v
        ratio = torch.where(z == 0, torch.zeros_like(z), p_out / z)
        return u * ratio, v * ratio


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    a = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, groups=conv.groups
    ).double()
    with torch.no_grad():
        fused.weight.copy_(conv.weight * a.view(-1, 1, 1, 1))
        b = conv.bias if conv.bias is not None else torch.zeros_like(a)
        fused.bias.copy_((b - bn.running_mean) * a + bn.bias)
    return fused


def _linear_layer(module, x):
    if isinstance(module, nn.Conv2d):
        kw = dict(stride=module.stride, padding=module.padding, groups=module.groups)
        w_pos = module.weight.clamp(min=0)
        return _Linear.apply(x, lambda t: module(t), lambda t: F.conv2d(t, w_pos, None, **kw))
    w_pos = module.weight.clamp(min=0)
    return _Linear.apply(x, lambda t: module(t), lambda t: F.linear(t, w_pos))


def mwp_forward(module, x, record=None, prefix=""):
    """Run ``module`` with MWP backward rules; ``record[name]`` keeps each child's output."""
    if isinstance(module, nn.Sequential):
        children = list(module.named_children())
        i = 0
        while i < len(children):
            name, child = children[i]
            if (
                isinstance(child, nn.Conv2d)
                and i + 1 < len(children)
                and isinstance(children[i + 1][1], nn.BatchNorm2d)
            ):
                child = _fold(child, children[i + 1][1])
                i += 1
                name = children[i][0]
            x = mwp_forward(child, x, record, prefix + name + ".")
            if record is not None:
                record[prefix + name] = x
            i += 1
        return x
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        return _linear_layer(module, x)
    if isinstance(module, (nn.ReLU, nn.ReLU6)):
        return _Pass.apply(x, module)
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AvgPool2d)):
        return _Linear.apply(x, module, module)
    if isinstance(module, (nn.MaxPool2d, nn.Flatten, nn.Identity)):
        return module(x)
    if isinstance(module, BasicBlock):
        body = mwp_forward(module.body, x, record, prefix + "body.")
        shortcut = mwp_forward(module.shortcut, x, record, prefix + "shortcut.")
        return _Pass.apply(_Add.apply(body, shortcut), torch.relu)
    if isinstance(module, InvertedResidual):
        y = mwp_forward(module.body, x, record, prefix + "body.")
        return _Add.apply(x, y) if module.residual else y
    raise TypeError(f"no MWP rule for {type(module).__name__} in the reference")


def torch_mwp(
    net: nn.Sequential, x: np.ndarray, target, saliency: str, contrast: str | None, contrastive: bool
):
    """P at ``saliency`` ("input" or a child name); c-MWP subtracted at ``contrast``."""
    net = net.double()
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    record = {}
    features = mwp_forward(net[:-1], xt, record)
    record["input"] = xt
    top = net[-1]
    onehot = F.one_hot(torch.as_tensor(target), top.out_features).double()
    logits = _linear_layer(top, features)
    below = record[saliency]
    if not contrastive:
        (p,) = torch.autograd.grad(logits, below, onehot)
        return p.numpy()
    dual = nn.Linear(top.in_features, top.out_features).double()
    with torch.no_grad():
        dual.weight.copy_(-top.weight)
        dual.bias.copy_(-top.bias)
    dual_logits = _linear_layer(dual, features)
    at = record[contrast]
    (p_target,) = torch.autograd.grad(logits, at, onehot, retain_graph=True)
    (p_dual,) = torch.autograd.grad(dual_logits, at, onehot, retain_graph=True)
    (p,) = torch.autograd.grad(at, below, p_target - p_dual)
    return p.numpy()


def torch_map(p: np.ndarray, size, contrastive: bool) -> np.ndarray:
    m = torch.tensor(p).sum(1, keepdim=True)
    if contrastive:
        m = m.clamp(min=0)
    return F.interpolate(m, size=size, mode="bilinear", align_corners=False)[:, 0].numpy()


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("excitation")


def _batch(shape, n=3, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (n, *shape)).astype(np.float32)


@pytest.fixture(scope="module")
def vgg(folder):
    return build("vgg_block"), engine.load(
        export_zoo_model("vgg_block", folder), providers=["CPUExecutionProvider"]
    )


@pytest.fixture(scope="module")
def resnet(folder):  # BatchNormalization nodes kept in the graph, residual Adds, global average pooling
    net = build("resnet_basic")
    clf = engine.load(export_zoo_model("resnet_basic", folder), providers=["CPUExecutionProvider"])
    assert any(n.op_type == "BatchNormalization" for n in clf.onnx_model.graph.node)
    return net, clf


def _p(clf, x, target, layer, contrastive):
    _, act, grad = clf.excitation(x, target, layer=layer, contrastive=contrastive)
    return act.astype(np.float64) * grad


# ------------------------------------------------------------------ against the torch reference
@pytest.mark.parametrize("contrastive", [False, True])
def test_vgg_input_and_feature_map(vgg, contrastive):
    net, clf = vgg
    x, target = _batch((3, 32, 32)), np.array([1, 4, 7])
    # conv(0) relu(1) conv(2) relu(3) pool(4) conv(5) relu(6) pool(7) flatten(8) linear(9)
    ref = torch_mwp(net, x, target, "input", "4", contrastive)
    assert relative_error(_p(clf, x, target, "input", contrastive), ref) <= TOL
    ref = torch_mwp(net, x, target, "6", "7", contrastive)  # layer=None: the last conv map
    p = _p(clf, x, target, None, contrastive)
    assert p.shape == ref.shape and relative_error(p, ref) <= TOL
    maps = explain(clf, x, "excitation_backprop", target=target, contrastive=contrastive)
    expected = torch_map(ref, (32, 32), contrastive)
    assert maps.shape == x.shape and np.array_equal(maps[:, 0], maps[:, 2])
    assert relative_error(maps[:, 0], expected) <= TOL
    if not contrastive:  # probabilities: total 1 (the zoo model's biases are small)
        assert np.all(p >= 0)


def test_vgg_named_layer(vgg):
    net, clf = vgg
    x, target = _batch((3, 32, 32), seed=1), np.array([0, 3, 9])
    first_pool = next(n.output[0] for n in clf.onnx_model.graph.node if n.op_type == "MaxPool")
    ref = torch_mwp(net, x, target, "4", "7", True)
    assert relative_error(_p(clf, x, target, first_pool, True), ref) <= TOL


@pytest.mark.parametrize("contrastive", [False, True])
def test_resnet_batchnorm_residual_gap(resnet, contrastive):
    net, clf = resnet
    x, target = _batch((3, 32, 32), seed=2), np.array([2, 5, 8])
    # conv(0) bn(1) relu(2) block(3) block(4) gap(5) flatten(6) linear(7)
    ref = torch_mwp(net, x, target, "input", "3", contrastive)
    assert relative_error(_p(clf, x, target, "input", contrastive), ref) <= TOL
    ref = torch_mwp(net, x, target, "4", "5", contrastive)
    assert relative_error(_p(clf, x, target, None, contrastive), ref) <= TOL


def test_mobilenet_relu6_depthwise_residual(folder):
    net = build("mobilenetv2_block")
    clf = engine.load(export_zoo_model("mobilenetv2_block", folder), providers=["CPUExecutionProvider"])
    x, target = _batch((3, 32, 32), n=2, seed=3), np.array([1, 6])
    # conv(0) bn(1) relu6(2) block(3) block(4) conv(5) bn(6) relu6(7) gap(8) flatten(9) linear(10)
    ref = torch_mwp(net, x, target, "input", "4", True)
    assert relative_error(_p(clf, x, target, "input", True), ref) <= TOL


# ------------------------------------------------------------------ analytic properties
def test_conservation_with_zero_biases(folder):
    """No biases and inputs > 0: z+ > 0 wherever P flows, so P sums to 1 at every layer (and the
    target and the dual each sum to 1, so the contrastive P sums to 0 before clamping)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )
    with torch.no_grad():
        for m in net:
            if hasattr(m, "bias") and m.bias is not None:
                m.bias.zero_()
    clf = engine.load(export(net, (3, 16, 16), folder), providers=["CPUExecutionProvider"])
    x = _batch((3, 16, 16), n=4, seed=4) + 0.01
    target = np.array([0, 1, 2, 4])
    for contrastive, total in ((False, 1.0), (True, 0.0)):
        for layer in ("input", None):
            p = _p(clf, x, target, layer, contrastive)
            np.testing.assert_allclose(p.reshape(len(x), -1).sum(1), total, atol=1e-5)


@pytest.mark.filterwarnings("ignore::engine.checked.InputRangeWarning")  # signed inputs on purpose
def test_two_layer_closed_form(folder):
    """x (6) -> MatMul W1 + b1 -> ReLU -> Gemm W2 + b2: P(h_i) = h_i W2+_ti / Σ_i W2+_ti h_i and
    P(x_j) = x+_j Σ_i W1+_ji P(h_i) / Σ_j W1+_ji x+_j, written in numpy."""
    rng = np.random.default_rng(5)
    d, k, c = 6, 5, 4
    w1, b1 = rng.normal(size=(d, k)), rng.normal(size=k) * 0.1
    w2, b2 = rng.normal(size=(c, k)), rng.normal(size=c) * 0.1
    f32 = lambda a, n: numpy_helper.from_array(np.asarray(a, np.float32), n)  # noqa: E731
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["m"]),
            helper.make_node("Add", ["m", "b1"], ["pre"]),
            helper.make_node("Relu", ["pre"], ["h"]),
            helper.make_node("Gemm", ["h", "w2", "b2"], ["logits"], transB=1),
        ],
        "two_layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", d])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", c])],
        [f32(w1, "w1"), f32(b1, "b1"), f32(w2, "w2"), f32(b2, "b2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    clf = engine.load(model, providers=["CPUExecutionProvider"])
    x = rng.normal(size=(5, d)).astype(np.float32)  # signed: negative inputs carry no P
    target = np.array([0, 1, 2, 3, 1])
    xd = x.astype(np.float64)
    h = np.maximum(xd @ w1 + b1, 0)

    def down(w_top):
        wp = np.maximum(w_top, 0)[target]  # (N, k)
        z2 = (h * wp).sum(1, keepdims=True)
        p_h = h * wp / np.where(z2 == 0, np.inf, z2)  # 0 where z+ = 0
        xp = np.maximum(xd, 0)
        z1 = xp @ np.maximum(w1, 0)
        return xp * ((p_h / np.where(z1 == 0, np.inf, z1)) @ np.maximum(w1, 0).T)

    plain, dual = down(w2), down(-w2)
    got = explain(clf, x, "excitation_backprop", target=target, layer="input", contrastive=False)
    assert relative_error(got, plain) <= TOL
    got = explain(clf, x, "excitation_backprop", target=target, layer="input")
    assert relative_error(got, np.maximum(plain - dual, 0)) <= TOL


# ------------------------------------------------------------------ errors
def test_unsupported_ops_are_refused(folder):
    mlp = engine.load(export_zoo_model("mlp", folder), providers=["CPUExecutionProvider"])
    with pytest.raises(UnsupportedModelError, match=r"node .*\(op Sigmoid\)"):
        explain(mlp, np.zeros((1, 16), np.float32), "excitation_backprop", layer="input")

    class Product(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.fc = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3), nn.Linear(4 * 6 * 6, 3)

        def forward(self, x):
            return self.fc((self.a(x) * self.b(x)).flatten(1))

    clf = engine.load(export(Product(), (3, 8, 8), folder), providers=["CPUExecutionProvider"])
    with pytest.raises(UnsupportedModelError, match=r"\(op Mul\).*product of two activations"):
        clf.excitation(_batch((3, 8, 8), n=1), 0, layer="input")


def test_bad_parameters(vgg):
    _, clf = vgg
    x = _batch((3, 32, 32), n=1)
    with pytest.raises(ParameterError, match="contrastive"):
        explain(clf, x, "excitation_backprop", contrastive="yes")
    with pytest.raises(ParameterError, match="layer"):
        explain(clf, x, "excitation_backprop", layer=3)
    with pytest.raises(ParameterError, match="layer_layout"):
        explain(clf, x, "excitation_backprop", layer_layout="CHW")
    with pytest.raises(InputError, match="no_such_tensor"):
        explain(clf, x, "excitation_backprop", layer="no_such_tensor")

    class Analytic:  # a ClassifierLike without an ONNX graph
        layout, input_shape, num_classes, input_range, batch_size = "NCHW", (3, 32, 32), 10, (0, 1), None

        def predict(self, x):
            return np.zeros((len(x), 10), np.float32)

    with pytest.raises(InputError, match="needs an ONNX Classifier"):
        explain(Analytic(), x, "excitation_backprop", target=0)


def test_compiled_model_metadata(vgg):
    _, clf = vgg
    info = clf._gradient_session("excitation", None)[1]
    assert info.rule == "excitation" and info.tap is None and info.input_gradient
    graph = onnx.load_from_string(clf._compiled[("excitation", None)][0]).graph
    assert {i.name for i in graph.input} >= {clf._mf.input_name}
    assert not any(i.name == "onnxplain_excitation_constant" for i in graph.input)


def test_replaced_weights_change_the_rule(vgg):
    """Classifier.with_initializers (the sanity checks' re-draws): W+ follows the new weights."""
    net, clf = vgg
    weights = [i.name for i in clf.onnx_model.graph.initializer if len(i.dims) == 4]
    name = weights[1]  # the second convolution's kernel
    new = np.random.default_rng(6).normal(0, 0.2, tuple(net[2].weight.shape)).astype(np.float32)
    changed = clf.with_initializers({name: new})
    other = build("vgg_block")
    with torch.no_grad():
        other[2].weight.copy_(torch.from_numpy(new))
    x, target = _batch((3, 32, 32), n=2, seed=7), np.array([3, 8])
    ref = torch_mwp(other, x, target, "input", "4", True)
    assert relative_error(_p(changed, x, target, "input", True), ref) <= TOL
    assert relative_error(_p(clf, x, target, "input", True), ref) > 1e-2
