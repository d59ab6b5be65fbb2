"""Ops the compiler used to refuse (issue #9 §1, §2), each in a tiny model checked against torch
autograd (or an ONNX definition written in torch): Resize, ReduceProd, CumSum, the trigonometric
and rounding ops, variadic Sum/Mean and the other reductions, GatherElements/GatherND/Trilu
gradients, resnest's AveragePool after a computed reshape, the MatMul form of Einsum, and a small
ViT on OpenVINO. docs/compiler-coverage.md explains each rewrite."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import helper, numpy_helper

import engine
from engine.compile import UnsupportedModelError
from engine.compile.graph import infer_shapes
from engine.compile.rewrites import apply_rewrites
from tests.gradcheck import check_module, export, relative_error, torch_gradient
from tests.test_coverage import _check, _info, check_onnx, onnx_classifier
from tests.test_lowering import Head, Lambda


def _cat(parts):
    return torch.cat([p.flatten(1) for p in parts], 1)


# ------------------------------------------------------------------------------------- Resize
def _resizes(x):  # x: (b, 2, 6, 4)
    return _cat(
        [
            F.interpolate(x, scale_factor=2, mode="nearest"),
            F.interpolate(x, size=(5, 7), mode="nearest"),
            F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False),
            F.interpolate(x, size=(5, 7), mode="bilinear", align_corners=True),
            F.interpolate(x, size=(7, 9), mode="bicubic", align_corners=False),
            F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False),  # downsampling
            F.interpolate(x[:, :, 0], scale_factor=3, mode="linear", align_corners=False),  # 1-D
            # 5-D: the first spatial axis is neither of the last two (Transpose, MatMul, Transpose)
            F.interpolate(x.unsqueeze(2).expand(-1, -1, 3, -1, -1), size=(5, 3, 2), mode="trilinear"),
        ]
    )


@pytest.mark.slow
def test_resize_matches_torch(tmp_path):
    """nearest (scales and sizes), bilinear with half_pixel and align_corners, bicubic, a
    downsampling, 1-D linear and trilinear, as F.interpolate exports them (sizes computed as
    Concat(Shape(x)[:2], size))."""
    clf, _ = _check(Lambda(_resizes), (2, 6, 4), tmp_path)
    assert _info(clf).self_check["status"] == "passed"


def _resize_graph(tmp_path, scales_node, **attributes):
    nodes = [*scales_node, helper.make_node("Resize", ["input", "", "scales"], ["act"], **attributes)]
    return onnx_classifier(tmp_path, nodes, (2, 3, 4), features=2 * 6 * 8)


@pytest.mark.parametrize(
    "case, match",
    [
        ("computed", "scales are computed"),
        ("crop", "tf_crop_and_resize"),
        ("channels", "batch or channel"),
    ],
)
def test_resize_refusals_name_the_reason(tmp_path, case, match):
    const = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "s0")
    computed = [
        helper.make_node("Constant", [], ["s0"], value=const),
        helper.make_node("ReduceMax", ["input"], ["m"], keepdims=0),  # data-dependent
        helper.make_node("Mul", ["s0", "m"], ["s1"]),
        helper.make_node("Div", ["s1", "m"], ["scales"]),
    ]
    if case == "computed":
        path, _ = _resize_graph(tmp_path, computed)
    else:
        value = [1, 1, 2, 2] if case == "crop" else [1, 2, 1, 1]
        scales = numpy_helper.from_array(np.array(value, np.float32), "v")
        extra = {"coordinate_transformation_mode": "tf_crop_and_resize"} if case == "crop" else {}
        path, _ = _resize_graph(
            tmp_path, [helper.make_node("Constant", [], ["scales"], value=scales)], **extra
        )
    model = onnx.load(path)
    with pytest.raises(UnsupportedModelError, match=match):
        apply_rewrites(model)


# ------------------------------------- element-wise ops, reductions, scans, gathers (one model)
INDEX = torch.tensor([[[2, 0, 0], [1, 1, 3], [3, 2, 1]]])


def _torch_ops(x):  # x: (b, 3, 4) in (-1, 1)
    y = 0.9 * x
    return _cat(
        [
            torch.atan(3 * x),
            torch.asin(y),
            torch.acos(y),
            torch.tan(x),
            torch.floor(3 * x) * x,  # zero gradient through floor, x's own through the product
            torch.ceil(3 * x) * x,
            torch.round(3 * x) * x,
            torch.fmod(3 * x, 0.7),
            torch.remainder(3 * x, 0.7),
            x.prod(2),
            x.prod(1, keepdim=True),
            x.cumsum(2),
            x.cumsum(1),
            torch.logsumexp(x, 2),
            x.norm(dim=2),
            F.normalize(x, dim=1),
            torch.gather(x, 2, INDEX.expand(x.shape[0], -1, -1)),
            torch.triu(x, 1),
            torch.tril(x),
        ]
    )


@pytest.mark.slow
def test_elementwise_reduction_and_gather_ops_match_torch(tmp_path):
    """Atan, Asin, Acos, Tan, Floor/Ceil/Round (zero gradient), Mod; ReduceProd (a tree of
    Muls), CumSum (a triangle MatMul), ReduceLogSumExp and ReduceL2 (whose builder gradients break
    below opset 18; torch exports opset 17), GatherElements (torch.gather) and Trilu. Then a
    zero factor (prod's gradient is the product of the others, no division by zero) and a zero
    row (the norm's gradient is 0), as torch's backward gives."""
    clf, _ = _check(Lambda(_torch_ops), (3, 4), tmp_path)
    assert _info(clf).self_check["status"] == "passed"
    torch.manual_seed(3)
    head = Head(Lambda(_torch_ops), (3, 4)).eval()  # the module _check compiled
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 4)).astype(np.float32)
    x[0, 0, 1] = 0.0
    x[1, :, 2] = 0.0
    target = np.array([1, 2])
    _, grads = clf.gradient(x, target)
    _, ref = torch_gradient(head, x, target)
    assert np.all(np.isfinite(grads))
    assert relative_error(grads, ref) <= 1e-5


HYPERBOLIC = [
    ("Sinh", torch.sinh),
    ("Cosh", torch.cosh),
    ("Asinh", torch.asinh),
    ("Atanh", lambda t: torch.atanh(0.5 * t)),
    ("Acosh", lambda t: torch.acosh(t.abs() + 1.5)),
]


@pytest.mark.slow
def test_onnx_only_ops_match_their_definitions(tmp_path):
    """Ops torch does not export, from a hand-built graph against their ONNX definitions in
    torch: Sinh, Cosh, Asinh, Atanh, Acosh; CumSum exclusive / reverse; ReduceSumSquare,
    ReduceLogSum; variadic Sum and Mean (broadcasting); GatherND (a row picked twice: its
    gradient adds up) and GatherElements with negative indices."""
    nodes = [
        helper.make_node("Mul", ["input", "half"], ["half_x"]),
        helper.make_node("Abs", ["input"], ["abs_x"]),
        helper.make_node("Add", ["abs_x", "one_five"], ["shifted"]),
    ]
    src = {"Atanh": "half_x", "Acosh": "shifted"}
    nodes += [helper.make_node(op, [src.get(op, "input")], [f"h{i}"]) for i, (op, _) in enumerate(HYPERBOLIC)]
    nodes += [
        helper.make_node("CumSum", ["input", "axis"], ["c0"], exclusive=1),
        helper.make_node("CumSum", ["input", "axis"], ["c1"], reverse=1),
        helper.make_node("CumSum", ["input", "axis"], ["c2"], reverse=1, exclusive=1),
        helper.make_node("ReduceSumSquare", ["input", "axes"], ["r0"], keepdims=1),
        helper.make_node("ReduceLogSum", ["shifted", "axes"], ["r1"], keepdims=1),
        helper.make_node("Sum", ["c0", "c1", "input"], ["s0"]),
        helper.make_node("Mean", ["c2", "r0", "r1"], ["m0"]),  # (3, 4) with (3, 1)
        helper.make_node("Transpose", ["input"], ["t"], perm=[1, 2, 0]),  # (3, 4, b)
        helper.make_node("GatherND", ["t", "nd"], ["g"]),
        helper.make_node("Transpose", ["g"], ["gt"], perm=[2, 0, 1]),
        helper.make_node("Shape", ["input"], ["in_shape"]),
        helper.make_node("Slice", ["in_shape", "zero", "one"], ["b"]),
        helper.make_node("Concat", ["b", "tail"], ["shape"], axis=0),
        helper.make_node("Expand", ["el", "shape"], ["el_b"]),
        helper.make_node("GatherElements", ["input", "el_b"], ["e"], axis=2),
    ]
    names = [f"h{i}" for i in range(len(HYPERBOLIC))] + ["c0", "c1", "c2", "s0", "m0", "gt", "e"]
    nodes.append(helper.make_node("Concat", names, ["act"], axis=2))
    inits = [numpy_helper.from_array(np.float32(v), k) for k, v in (("half", 0.5), ("one_five", 1.5))]
    inits += [
        numpy_helper.from_array(np.array(v, np.int64), k)
        for k, v in {
            "axis": 2,
            "axes": [2],
            "nd": [[0], [2], [0]],
            "el": [[[-1, 0], [1, -2], [-1, -1]]],
            "zero": [0],
            "one": [1],
            "tail": [3, 2],
        }.items()
    ]
    width = 4 * (len(HYPERBOLIC) + 6) + 2
    path, fc = onnx_classifier(tmp_path, nodes, (3, 4), inits=inits, opset=18, features=3 * width)
    el = torch.tensor([[-1, 0], [1, -2], [-1, -1]]) % 4

    def reference(t):
        rc = t.flip(2).cumsum(2).flip(2)
        c0, c1, c2 = t.cumsum(2) - t, rc, rc - t
        r0 = (t * t).sum(2, keepdim=True)
        r1 = (t.abs() + 1.5).sum(2, keepdim=True).log()
        hyper = [f(t) for _, f in HYPERBOLIC]
        gathered = [t[:, [0, 2, 0]], torch.gather(t, 2, el.expand(t.shape[0], -1, -1))]
        return torch.cat([*hyper, c0, c1, c2, c0 + c1 + t, (c2 + r0 + r1) / 3, *gathered], 2)

    check_onnx(path, fc, reference, (3, 4), low=-0.9, high=0.9)


# ----------------------------------------------------------------- resnest's split attention
class SplitAttention(nn.Module):
    """timm's resnest SplitAttn (radix 2) followed by its avd AvgPool2d(3, 2, 1): the reshape to
    (B, radix, RC // radix, H, W) reads x.shape, so shape inference loses the channel and spatial
    sizes the AveragePool gradient needs."""

    def __init__(self, c=4, radix=2):
        super().__init__()
        self.radix = radix
        self.conv = nn.Conv2d(c, c * radix, 3, padding=1, groups=radix)
        self.fc1, self.fc2 = nn.Conv2d(c, 8, 1), nn.Conv2d(8, c * radix, 1)
        self.pool = nn.AvgPool2d(3, 2, 1)

    def forward(self, x):
        x = F.relu(self.conv(x))
        b, rc, h, w = x.shape
        x = x.reshape((b, self.radix, rc // self.radix, h, w))
        attn = self.fc2(F.relu(self.fc1(x.sum(dim=1).mean((2, 3), keepdim=True))))
        attn = attn.view(b, 1, self.radix, -1).transpose(1, 2).softmax(dim=1).reshape(b, -1)
        out = (x * attn.reshape((b, self.radix, rc // self.radix, 1, 1))).sum(dim=1)
        return self.pool(out)


@pytest.mark.slow
def test_split_attention_average_pool(tmp_path):
    clf, _ = _check(SplitAttention(), (4, 7, 7), tmp_path)
    check = _info(clf).self_check
    # the builder's AveragePoolGrad kernel needs the pool's input dims: the self-check measures
    # them and writes them into its copy of the graph, so the check runs instead of being skipped
    assert check["status"] == "passed", check


# --------------------------------------------------------------------------------------- Einsum
class Contractions(nn.Module):
    """Attention scores and values, multi-letter groups, three operands, a letter summed in one
    operand only, and a broadcast ellipsis."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 4, 5))
        self.v = nn.Parameter(torch.randn(3))

    def forward(self, x):  # x: (b, 3, 4)
        q = x.reshape(-1, 3, 2, 2).transpose(1, 2)  # (b, h=2, i=3, d=2)
        s = torch.einsum("bhid,bhjd->bhij", q, q)
        parts = [
            s,
            torch.einsum("bhij,bhjd->bhid", s.softmax(-1), q),
            torch.einsum("bij,cjk->bick", x, self.w),  # free groups (b, i) and (c, k)
            torch.einsum("bi,ij,bj->b", x[:, 0, :3], x[0, :3, :3], x[:, 1, :3]).unsqueeze(1),
            torch.einsum("bij,i->bj", x, self.v),
            torch.einsum("bij,bkj->bk", x, x),  # i summed in the first operand alone
            torch.einsum("...ij,...jk->...ik", x, x.transpose(1, 2)),
        ]
        return _cat(parts)


@pytest.mark.slow
def test_einsum_is_a_matmul_and_matches_torch(tmp_path):
    torch.manual_seed(5)
    module = Head(Contractions(), (3, 4))
    clf, _ = check_module(module, (3, 4), tmp_path)
    assert _info(clf).self_check["status"] == "passed"
    # memory: no tensor of the rewritten forward graph is larger than the operands and results
    path = export(module, (3, 4), tmp_path)
    model = onnx.load(path)
    shapes = infer_shapes(model)
    largest = max(int(np.prod([d for d in dims[1:]])) for dims in shapes.values() if dims and len(dims) > 1)
    rewritten, _ = apply_rewrites(model)
    ops = [n.op_type for n in rewritten.graph.node]
    assert "Einsum" not in ops and ops.count("MatMul") >= 8
    new_shapes = infer_shapes(rewritten)
    sizes = [
        int(np.prod(dims[1:]))
        for name, dims in new_shapes.items()
        if name.startswith("onnxplain/einsum") and dims and all(isinstance(d, int) for d in dims[1:])
    ]
    assert sizes and max(sizes) <= largest


# ------------------------------------------------------------------------- OpenVINO, a ViT
@pytest.mark.slow
def test_vit_gradient_model_runs_on_openvino(zoo_onnx, tmp_path):
    """The tiny ViT (patch Conv, class token, attention, LayerNorm, exact GELU): its MatMul
    gradients reduce along broadcast axes that are now constants, so OpenVINO loads the portable
    gradient model, and both runtimes agree with torch."""
    pytest.importorskip("openvino", reason="openvino is not installed")
    from engine.compile import compile_to_file
    from models import zoo

    path = zoo_onnx("tiny_vit_erf")
    grad_path = tmp_path / "grad.onnx"
    compile_to_file(path, grad_path)
    graph = onnx.load(grad_path).graph
    assert not [n for n in graph.node if n.op_type == "NonZero"]  # every reduction axis is static
    x = np.random.default_rng(7).uniform(0, 1, (3, *zoo.ZOO["tiny_vit_erf"][1])).astype(np.float32)
    target = np.arange(3) % 3
    _, want = torch_gradient(zoo.build("tiny_vit_erf"), x, target, output="probability")
    got = {}
    for runtime in ("onnxruntime", "openvino"):
        clf = engine.load(path, gradient_model=grad_path, runtime=runtime)
        got[runtime] = clf.gradient(x, target, output="probability")[1]
        assert relative_error(got[runtime], want) < 1e-5, runtime
    assert relative_error(got["openvino"], got["onnxruntime"]) < 1e-5


@pytest.mark.slow
def test_transposed_weights_follow_replaced_initializers(tmp_path):
    """The MatMul gradients' Wᵀ is stored as its own constant (for OpenVINO); replacing the
    weights (the sanity checks' re-initialisation) recomputes it: the gradient equals that of a
    model file compiled afresh with the new weights."""
    torch.manual_seed(2)
    module = Head(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4)), (3, 4))
    path = export(module, (3, 4), tmp_path)
    clf = engine.load(path, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 4)).astype(np.float32)
    target = np.array([1, 3])
    clf.gradient(x, target)
    grad_model = clf._compiled[("gradient", None)][0]
    grad_model = onnx.load_from_string(grad_model) if isinstance(grad_model, bytes) else grad_model
    assert any("const_transposed" in i.name for i in grad_model.graph.initializer)
    model = onnx.load(path)
    weights = {
        n.input[1]: numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == n.input[1]))
        for n in model.graph.node
        if n.op_type == "MatMul"
    }
    rng = np.random.default_rng(1)
    new = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in weights.items()}
    _, got = clf.with_initializers(new).gradient(x, target)
    for init in model.graph.initializer:
        if init.name in new:
            init.CopyFrom(numpy_helper.from_array(new[init.name], init.name))
    onnx.save(model, tmp_path / "replaced.onnx")
    _, want = engine.load(tmp_path / "replaced.onnx", providers=["CPUExecutionProvider"]).gradient(x, target)
    assert relative_error(got, want) <= 1e-6
