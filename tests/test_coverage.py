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
from tests.gradcheck import check_module, export, relative_error, torch_gradient
from tests.test_lowering import Head, Lambda


def _check(body, shape, tmp_path, **kw):
    torch.manual_seed(3)
    module = Head(body, shape)
    return check_module(module, shape, tmp_path, **kw)


def onnx_classifier(tmp_path, nodes, shape, *, inits=(), opset=17, batch="batch", seed=0, features=None):
    """input -> ``nodes`` (ending in tensor "act") -> Flatten -> MatMul to 4 classes, hand-built for
    ops torch never exports. ``features``: size of "act" per sample when it differs from the input's.
    Returns the path and the weight of the final MatMul."""
    rng = np.random.default_rng(seed)
    n = features or int(np.prod(shape))
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
def _divisions(x):  # x: (b, 3, 4)
    parts = [
        x / (1 + x * x),  # same shapes
        x / (1 + x.abs().sum(-1, keepdim=True)),  # the divisor broadcast
        x.sum(-1, keepdim=True) / (1 + x.abs()),  # the dividend broadcast
        x / x.norm(dim=1, keepdim=True).clamp(min=1e-3),  # GRN-like
    ]
    return torch.cat([p.flatten(1) for p in parts], 1)


def test_div_grad_matches_torch(tmp_path):
    clf, _ = _check(Lambda(_divisions), (3, 4), tmp_path)
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


# ------------------------------------------------------------------------------- activations
# One model per test holds every activation side by side (one compile instead of one each).
TORCH_ACTIVATIONS = {
    "softplus": nn.Softplus(),
    "softplus-beta": nn.Softplus(beta=2.0),
    "softsign": nn.Softsign(),
    "mish": nn.Mish(),
    "selu": nn.SELU(),
    "celu": nn.CELU(0.7),
    "prelu": nn.PReLU(8, init=0.2),
}


class Side(nn.Module):
    """Each activation on the same input, concatenated along the features."""

    def __init__(self, acts):
        super().__init__()
        self.acts = nn.ModuleList(acts)

    def forward(self, x):
        return torch.cat([a(x) for a in self.acts], 1)


def test_activations_match_torch(tmp_path):
    clf, _ = _check(
        nn.Sequential(nn.Linear(6, 8), Side(TORCH_ACTIVATIONS.values())), (6,), tmp_path, low=-3, high=3
    )
    assert _info(clf).self_check["status"] == "passed"


def test_activations_at_their_kinks_take_torch_side(tmp_path):
    """x = 0 exactly (the input itself): PRelu gives the slope, the Elu family gamma alpha / inner,
    Softplus 1/2, as torch's backward formulas do."""
    module = Side([nn.PReLU(1, init=0.3), nn.SELU(), nn.CELU(0.5), nn.Softplus()])
    torch.manual_seed(0)
    head = Head(module, (4,))
    clf = engine.load(export(head, (4,), tmp_path), providers=["CPUExecutionProvider"])
    x = np.array([[0.0, -1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
    target = np.array([0, 3])
    _, grads = clf.gradient(x, target)
    _, ref = torch_gradient(head, x, target)
    assert relative_error(grads, ref) <= 1e-6


# Ops torch does not export (tf2onnx and other exporters do): op, attributes, torch reference.
ONNX_ACTIVATIONS = [
    ("ThresholdedRelu", {"alpha": 0.4}, lambda t: F.threshold(t, 0.4, 0.0)),
    ("Softsign", {}, F.softsign),
    ("Softplus", {}, F.softplus),
    ("Mish", {}, F.mish),  # opset 18
    ("Selu", {"alpha": 1.5, "gamma": 1.1}, lambda t: 1.1 * F.elu(t, 1.5)),
    ("Selu", {}, F.selu),
    ("Celu", {"alpha": 2.0}, lambda t: F.celu(t, 2.0)),
    ("Shrink", {"lambd": 0.4, "bias": 0.4}, lambda t: F.softshrink(t, 0.4)),
    ("Shrink", {"lambd": 0.4}, lambda t: F.hardshrink(t, 0.4)),
]


def test_onnx_activation_ops_match_torch(tmp_path):
    nodes = [
        helper.make_node(op, ["input"], [f"a{i}"], **kw) for i, (op, kw, _) in enumerate(ONNX_ACTIVATIONS)
    ]
    nodes.append(helper.make_node("Concat", [f"a{i}" for i in range(len(ONNX_ACTIVATIONS))], ["act"], axis=1))
    path, fc = onnx_classifier(tmp_path, nodes, (6,), opset=18, features=6 * len(ONNX_ACTIVATIONS))
    check_onnx(path, fc, lambda t: torch.cat([ref(t) for _, _, ref in ONNX_ACTIVATIONS], 1), (6,))


def test_softplus_is_stable_for_large_inputs(tmp_path):
    """log(1 + e^x) computed naively overflows at x > 88 in float32; the rewrite never does."""
    nodes = [helper.make_node("Softplus", ["input"], ["act"])]
    path, fc = onnx_classifier(tmp_path, nodes, (6,))
    clf = check_onnx(path, fc, F.softplus, (6,), low=-120.0, high=120.0)
    scores, grads = clf.gradient(np.full((1, 6), 100.0, np.float32), np.array([0]))
    assert np.all(np.isfinite(scores)) and np.all(np.isfinite(grads))


# --------------------------------------------- shared parameters: Identity chains, LayerNorm twice
def test_shared_parameters(tmp_path):
    """Two BatchNorms (after a ReLU, so torch cannot fold them into the Conv) with equal parameters:
    torch.onnx keeps one copy of each tensor and feeds the other uses through Identity nodes, as in
    DenseNet, RepVGG, LeViT; the BatchNorm rewrite reads its constants through the chain. Then one
    LayerNorm module applied twice (both nodes read the same scale and bias, as in swin_t): the
    builder would define body.N.weight_grad twice."""
    bns = [nn.BatchNorm2d(4), nn.BatchNorm2d(4)]
    gen = torch.Generator().manual_seed(0)
    values = {
        k: torch.rand(4, generator=gen) + 0.5 for k in ("weight", "bias", "running_mean", "running_var")
    }
    for bn in bns:
        for k, v in values.items():
            getattr(bn, k).data.copy_(v)
    ln = nn.LayerNorm(8)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-0.5, 0.5)
    body = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.ReLU(),
        bns[0],
        nn.Conv2d(4, 4, 3),
        nn.ReLU(),
        bns[1],
        nn.Flatten(),
        nn.Linear(36, 8),
        ln,
        nn.GELU(),
        nn.Linear(8, 8),
        ln,
    )
    torch.manual_seed(3)
    module = Head(body, (3, 7, 7))
    graph = onnx.load(export(module, (3, 7, 7), tmp_path)).graph
    assert sum(n.op_type == "Identity" for n in graph.node) >= 4  # the patterns are really there
    layer_norms = [n for n in graph.node if n.op_type == "LayerNormalization"]
    assert len(layer_norms) == 2 and layer_norms[0].input[1] == layer_norms[1].input[1]
    check_module(module, (3, 7, 7), tmp_path)


# ------------------------------------------------------------------------- constant subgraphs
class ScaledStdConv2d(nn.Conv2d):
    """Weight-standardised convolution as timm's ScaledStdConv2d / NF-Nets define it: the weight is
    normalised per output channel in the forward pass, with a training-mode batch_norm over the
    weight tensor, which torch exports as graph nodes fed only by initializers."""

    def __init__(self, cin, cout, k, gamma=1.0, eps=1e-6):
        super().__init__(cin, cout, k)
        self.gain = nn.Parameter(torch.rand(cout, 1, 1, 1) + 0.5)
        self.scale = gamma * self.weight[0].numel() ** -0.5
        self.eps = eps

    def forward(self, x):
        w = self.weight.reshape(1, self.out_channels, -1)
        gain = (self.gain * self.scale).view(-1)
        w = F.batch_norm(w, None, None, weight=gain, training=True, momentum=0.0, eps=self.eps)
        return F.conv2d(x, w.reshape_as(self.weight), self.bias)


def test_weight_standardisation_is_folded(tmp_path):
    torch.manual_seed(4)
    _check(nn.Sequential(ScaledStdConv2d(3, 4, 3), nn.ReLU(), ScaledStdConv2d(4, 4, 3)), (3, 7, 7), tmp_path)


def _graph_with_constant_branch(expand_to):
    """input * (Expand(c, shape) + 1): a constant branch whose result is ``expand_to`` large."""
    nodes = [
        helper.make_node("Expand", ["c", "shape"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["k"]),
        helper.make_node("Mul", ["input", "k"], ["logits"]),
    ]
    inits = [
        numpy_helper.from_array(np.full((1,), 2.0, np.float32), "c"),
        numpy_helper.from_array(np.array([expand_to], np.int64), "shape"),
        numpy_helper.from_array(np.float32(1), "one"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["b", expand_to])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", expand_to])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_constant_folding_evaluates_and_is_bounded():
    from engine.compile.rewrites.folding import _FOLD_FLOOR, fold_constant_nodes

    folded, count = fold_constant_nodes(_graph_with_constant_branch(8))
    assert count == 1 and [n.op_type for n in folded.graph.node] == ["Mul"]
    k = next(i for i in folded.graph.initializer if i.name == "k")
    np.testing.assert_array_equal(numpy_helper.to_array(k), np.full(8, 3.0, np.float32))
    # an Expand that would write a tensor far larger than its sources stays in the graph
    big = _graph_with_constant_branch(_FOLD_FLOOR * 2)
    same, count = fold_constant_nodes(big)
    assert count == 0 and same is big


# ----------------------------------------------------------------- InstanceNorm, reflect/edge Pad
def _randomise_affine(module):
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.GroupNorm, nn.InstanceNorm2d)) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return module


def test_norms_padding_and_prelu_on_feature_maps(tmp_path):
    """GroupNorm (exported as Reshape -> InstanceNormalization -> Reshape -> Mul -> Add), an affine
    InstanceNorm2d, Conv padding_mode reflect / replicate and F.pad reflect (ConvNeXt-style and
    image-to-image stems), PReLU with its per-channel (C, 1, 1) slope."""
    prelu = nn.PReLU(4)
    with torch.no_grad():
        prelu.weight.uniform_(-0.5, 0.5)
    body = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=2, padding_mode="reflect"),
        nn.GroupNorm(2, 4),
        prelu,
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="replicate"),
        nn.InstanceNorm2d(4, affine=True),
        Lambda(lambda t: F.pad(t, (3, 0, 1, 2), mode="reflect")),
    )
    _check(_randomise_affine(body), (3, 6, 7), tmp_path)


def test_pad_modes_with_axes_input(tmp_path):
    """Opset 19's wrap mode and the axes input (opset 18), reflect of a 1-D axis and edge, from a
    hand-built graph; the reference is numpy's np.pad written as torch indexing."""
    prev = {"edge": "p1", "wrap": "p2"}
    out = {"reflect": "p1", "edge": "p2", "wrap": "act"}

    def pad(mode, pads, axes):
        src = "input" if mode == "reflect" else prev[mode]
        return helper.make_node("Pad", [src, pads, "", axes], [out[mode]], mode=mode)

    nodes = [pad("reflect", "pr", "ax_r"), pad("edge", "pe", "ax_e"), pad("wrap", "pw", "ax_w")]
    inits = [
        numpy_helper.from_array(np.array(v, np.int64), k)
        for k, v in {
            "pr": [2, 1],
            "ax_r": [-1],
            "pe": [1, 0, 0, 2],
            "ax_e": [1, 2],
            "pw": [2, 3],
            "ax_w": [1],
        }.items()
    ]
    path, fc = onnx_classifier(
        tmp_path, nodes, (3, 4), inits=inits, opset=19, features=(3 + 1 + 5) * (4 + 3 + 2)
    )

    def reference(t):
        idx = lambda n, b, e, mode: torch.as_tensor(np.pad(np.arange(n), (b, e), mode=mode))  # noqa: E731
        t = t[:, :, idx(4, 2, 1, "reflect")]
        t = t[:, idx(3, 1, 0, "edge")][:, :, idx(7, 0, 2, "edge")]
        return t[:, idx(4, 2, 3, "wrap")]

    check_onnx(path, fc, reference, (3, 4))


# ------------------------------------------------------------------------ self-check tolerance
def test_tolerance_grows_with_depth_and_spread():
    from engine.compile.selfcheck import FLOAT32_EPS, FLOOR, graph_depth, tolerance

    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["b"])]
    nodes += [helper.make_node("Add", ["a", "b"], ["c"]), helper.make_node("Exp", ["x"], ["d"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])], [])
    model = helper.make_model(graph)
    assert [graph_depth(model, t) for t in "abcd"] == [1, 2, 3, 1]
    assert tolerance(4, 0.0) == FLOOR
    assert tolerance(10_000, 0.0) == pytest.approx(100 * FLOAT32_EPS)
    assert tolerance(4, 1e-5) == pytest.approx(8e-5)


def test_self_check_runs_on_positive_slice_steps_and_records_skips(tmp_path):
    """torch writes a steps input on every slice: only negative steps (a wrong builder kernel)
    skip the check, and the reason is recorded."""
    clf, _ = _check(Lambda(lambda x: x[:, 1:, ::2]), (3, 6), tmp_path)
    check = _info(clf).self_check
    assert check["status"] == "passed" and check["depth"] > 0
    assert check[_info(clf).input_gradient]["tolerance"] >= 1e-6
    clf, _ = _check(Lambda(lambda x: x.flip(1)), (3, 6), tmp_path)
    check = _info(clf).self_check
    assert check["status"] == "skipped" and "negative" in check["reason"]


def test_self_check_still_catches_a_small_lowering_error(tmp_path, monkeypatch):
    """A SigmoidGrad lowering wrong by 1e-4 relative is refused (the derived tolerance is ~1e-6 on
    a graph this small); self_check=False records that the check did not run."""
    import importlib

    from engine.compile import LoweringError, compile_model

    lower = importlib.import_module("engine.compile.lowering.registry")
    good = lower.LOWERINGS[("com.microsoft", "SigmoidGrad")]

    def off(node, ctx):
        nodes = good(node, ctx)
        tmp = ctx.fresh("off")
        nodes[-1].output[0] = tmp
        return nodes + [lower.make("Mul", [tmp, ctx.const(np.float32(1 + 1e-4))], [node.output[0]])]

    torch.manual_seed(0)
    path = export(Head(nn.Sequential(nn.Linear(6, 8), nn.Sigmoid()), (6,)), (6,), tmp_path)
    monkeypatch.setitem(lower.LOWERINGS, ("com.microsoft", "SigmoidGrad"), off)
    with pytest.raises(LoweringError, match="self-check failed"):
        compile_model(path)
    _, info = compile_model(path, self_check=False)
    assert info.self_check["status"] == "not run" and "self_check=False" in info.self_check["reason"]


# ----------------------------------------------------------------- reductions and Sign
def test_reduce_min_l1_and_sign(tmp_path):
    """ReduceMin (ties share the gradient, as torch.amin: the duplicated column ties always),
    ReduceL1 (torch's p=1 norm) and Sign (inside torch's lp_pool export; derivative 0)."""

    def body(x):
        tied = torch.cat([x, x[:, :, :1]], 2)
        parts = [tied.amin(2), x.norm(p=1, dim=2), F.lp_pool1d(x, 2, 2).flatten(1)]
        return torch.cat([p.flatten(1) for p in parts], 1)

    _check(Lambda(body), (2, 6), tmp_path)


# --------------------------------------------------------------------------------------- Einsum
class Einsums(nn.Module):
    """Outer product, batched matmul, ellipsis against a weight, an implicit output, a transpose."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3))
        self.v = nn.Parameter(torch.randn(4))

    def forward(self, x):  # x: (b, 3, 4)
        parts = [
            torch.einsum("bi,bj->bij", x[:, 0], x[:, 1]),
            torch.einsum("bij,bjk->bik", x, x.transpose(1, 2)),
            torch.einsum("...i,i->...", x, self.v),
            torch.einsum("bij,jk", x, self.w),
            torch.einsum("bij->bji", x),
        ]
        return torch.cat([p.flatten(1) for p in parts], 1)


def test_einsum_matches_torch(tmp_path):
    torch.manual_seed(5)
    clf, _ = _check(Einsums(), (3, 4), tmp_path)
    assert _info(clf).self_check["status"] == "passed"


def test_einsum_diagonal_is_refused(tmp_path):
    nodes = [helper.make_node("Einsum", ["input"], ["act"], equation="bii->bi")]
    path, _ = onnx_classifier(tmp_path, nodes, (3, 3), features=3)
    from engine.compile import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="diagonal"):
        engine.load(path, providers=["CPUExecutionProvider"]).gradient(np.zeros((1, 3, 3), np.float32), 0)


def test_depth_to_space_and_back(tmp_path):
    """torch's pixel_shuffle exports DepthToSpace (CRD); a hand-built SpaceToDepth and DCR
    DepthToSpace are checked against their ONNX definitions written in torch."""
    _check(
        Lambda(lambda x: F.pixel_unshuffle(F.pixel_shuffle(x, 2) * 2, 2) + F.pixel_shuffle(x, 2).mean()),
        (8, 2, 3),
        tmp_path,
    )
    nodes = [
        helper.make_node("SpaceToDepth", ["input"], ["s"], blocksize=2),
        helper.make_node("Mul", ["s", "s"], ["sq"]),
        helper.make_node("DepthToSpace", ["sq"], ["act"], blocksize=2, mode="DCR"),
    ]
    path, fc = onnx_classifier(tmp_path, nodes, (2, 4, 6))

    def reference(t):
        b = t.shape[0]
        s = t.reshape(b, 2, 2, 2, 3, 2).permute(0, 3, 5, 1, 2, 4).reshape(b, 8, 2, 3)
        s = s * s
        return s.reshape(b, 2, 2, 2, 2, 3).permute(0, 3, 4, 1, 5, 2).reshape(b, 2, 4, 6)

    check_onnx(path, fc, reference, (2, 4, 6))
