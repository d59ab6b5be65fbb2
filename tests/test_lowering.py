"""Per-op lowering against torch autograd: each case is a tiny module around one op family, with
the edge cases named in design/lowering.md. The runtime batch (3) differs from the export batch (2)."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.gradcheck import check_module

torch.manual_seed(0)


class Head(nn.Module):
    """feature extractor -> flatten -> linear to 4 classes (keeps every case a classifier)."""

    def __init__(self, body: nn.Module, input_shape):
        super().__init__()
        self.body = body.eval()
        with torch.no_grad():
            n = body(torch.zeros(1, *input_shape)).numel()
        self.fc = nn.Linear(n, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.body(x), 1))


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def case(body, shape, **kw):
    torch.manual_seed(1)
    return pytest.param(body, shape, kw, id=kw.pop("id"))


CONV_CASES = [
    case(lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (3, 9, 9), id="conv-stride2-odd"),
    case(lambda: nn.Conv2d(3, 4, 3, stride=3, padding=0), (3, 10, 10), id="conv-stride3-crop"),
    case(lambda: nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0)), (3, 8, 7), id="conv-rect"),
    case(lambda: nn.Conv2d(3, 4, 3, dilation=2, padding=2), (3, 9, 9), id="conv-dilation"),
    case(lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1), (4, 6, 6), id="conv-groups"),
    case(lambda: nn.Conv2d(4, 4, 3, groups=4, stride=2, padding=1), (4, 7, 7), id="conv-depthwise-s2"),
    case(lambda: nn.Conv2d(4, 4, 3, groups=4, padding=1), (4, 7, 7), id="conv-depthwise-s1"),
    case(lambda: nn.Conv2d(4, 4, 1, groups=4, stride=2), (4, 7, 7), id="conv-depthwise-k1-s2-crop"),
    case(
        lambda: nn.Conv2d(4, 4, 3, groups=4, stride=2, dilation=2, padding=2),
        (4, 9, 9),
        id="conv-depthwise-s2-dilation",
    ),
    case(lambda: nn.Conv2d(4, 8, 3, groups=4, stride=3), (4, 10, 10), id="conv-depthwise-multiplier-s3"),
    case(lambda: nn.Conv2d(4, 4, 5, groups=4, stride=2, padding=2), (4, 8, 8), id="conv-depthwise-k5-s2"),
    case(
        lambda: nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(4, 4, 3, groups=4, stride=2)),
        (4, 8, 8),
        id="conv-depthwise-s2-asymmetric-pad",
    ),
    case(lambda: nn.Conv2d(4, 4, 3, groups=4, stride=(2, 3), padding=1), (4, 8, 9), id="conv-depthwise-s2x3"),
    case(lambda: nn.Conv1d(4, 4, 3, groups=4, stride=2, padding=1), (4, 11), id="conv1d-depthwise-s2"),
    # output planes over 16x16: zero insertion per (image, channel) instead of one tall image
    case(lambda: nn.Conv2d(16, 16, 3, groups=16, stride=2, padding=1), (16, 40, 40), id="conv-dw-s2-large"),
    case(lambda: nn.Conv2d(16, 16, 5, groups=16, stride=2, padding=2), (16, 33, 35), id="conv-dw-k5-s2-odd"),
    case(lambda: nn.Conv2d(3, 4, 3, padding="same"), (3, 6, 6), id="conv-same"),
    case(lambda: nn.Conv1d(3, 4, 5, stride=2, padding=2), (3, 11), id="conv1d"),
    case(lambda: nn.Conv3d(2, 3, 3, stride=(1, 2, 2), padding=1), (2, 4, 6, 6), id="conv3d"),
    case(lambda: nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1), (3, 4, 4), id="convtranspose"),
]

POOL_CASES = [
    case(lambda: nn.MaxPool2d(2), (2, 6, 6), id="maxpool"),
    case(lambda: nn.MaxPool2d(3, stride=2, padding=1), (2, 7, 7), id="maxpool-pad"),
    case(lambda: nn.MaxPool2d(3, stride=2, ceil_mode=True), (2, 8, 8), id="maxpool-ceil"),
    case(lambda: nn.MaxPool2d(2, dilation=2), (2, 7, 7), id="maxpool-dilation"),
    case(lambda: nn.MaxPool1d(3, stride=2), (2, 9), id="maxpool1d"),
    case(lambda: nn.MaxPool3d(2), (2, 4, 4, 4), id="maxpool3d"),
    case(lambda: nn.AvgPool2d(2), (2, 6, 6), id="avgpool"),
    case(lambda: nn.AvgPool2d(3, stride=2, padding=1), (2, 7, 7), id="avgpool-pad-include"),
    case(
        lambda: nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
        (2, 7, 7),
        id="avgpool-pad-exclude",
    ),
    case(lambda: nn.AvgPool2d(3, stride=2, ceil_mode=True), (2, 8, 8), id="avgpool-ceil"),
    case(
        lambda: nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True), (2, 8, 8), id="avgpool-ceil-include-pad"
    ),
    case(
        lambda: nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
        (2, 8, 8),
        id="avgpool-ceil-exclude-pad",
    ),
    case(lambda: nn.AvgPool1d(3, stride=2, padding=1), (2, 9), id="avgpool1d"),
    case(lambda: nn.AvgPool3d(2, stride=2), (2, 4, 4, 4), id="avgpool3d"),
    case(lambda: nn.AdaptiveAvgPool2d(1), (3, 5, 5), id="global-avgpool"),
]

ACTIVATION_CASES = [
    case(
        lambda: nn.Sequential(nn.Linear(6, 8), nn.Sigmoid(), nn.Linear(8, 8), nn.Tanh()),
        (6,),
        id="sigmoid-tanh",
    ),
    case(lambda: nn.Sequential(nn.Linear(6, 8), nn.LeakyReLU(0.1)), (6,), id="leaky-relu"),
    case(lambda: nn.Sequential(nn.Linear(6, 8), nn.ELU(0.7)), (6,), id="elu"),
    case(
        lambda: nn.Sequential(nn.Linear(6, 8), nn.Hardswish(), nn.Linear(8, 8), nn.Hardsigmoid()),
        (6,),
        id="hardswish-hardsigmoid",
    ),
    case(lambda: nn.Sequential(nn.Linear(6, 8), nn.GELU()), (6,), id="gelu-erf"),
    case(lambda: nn.Sequential(nn.Linear(6, 8), nn.GELU(approximate="tanh")), (6,), id="gelu-tanh"),
    case(lambda: nn.Sequential(nn.Linear(6, 8), nn.Softmax(-1)), (6,), id="softmax-inside"),
    case(lambda: nn.Sequential(nn.Linear(6, 8), nn.LogSoftmax(-1)), (6,), id="logsoftmax-inside"),
    case(lambda: nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8)), (6,), id="layernorm"),
    case(
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU6()),
        (3, 6, 6),
        id="batchnorm-relu6",
    ),
    case(lambda: nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU()), (6,), id="batchnorm1d"),
]

INDEXING_CASES = [
    case(lambda: Lambda(lambda x: torch.flip(x, dims=[2])), (2, 5, 5), id="slice-negative-step"),
    case(lambda: Lambda(lambda x: x[:, :, 1:5:2, 0:6:3].flip(-1)), (2, 6, 6), id="slice-steps"),
    case(lambda: Lambda(lambda x: x[:, 1:, :-1]), (3, 5), id="slice"),
    case(lambda: Lambda(lambda x: x[:, torch.tensor([0, 0, 2, 1, 2])]), (3, 4), id="gather-duplicates"),
    case(lambda: Lambda(lambda x: x[:, 0] * x[:, 1]), (3, 4), id="gather-scalar-index"),
    case(lambda: Lambda(lambda x: x.amax(dim=1)), (3, 5), id="reduce-max"),
    case(lambda: Lambda(lambda x: x * x), (5,), id="square-of-input"),
    case(lambda: Lambda(lambda x: torch.cat([x, x[:, :2] * 2], 1)), (5,), id="concat"),
    case(lambda: Lambda(lambda x: (x.unsqueeze(2) * x.unsqueeze(1)).flatten(1)), (3,), id="broadcast-mul"),
    case(lambda: Lambda(lambda x: x.transpose(1, 2) @ x), (3, 4), id="matmul-batched"),
    case(lambda: Lambda(lambda x: F.pad(x, (1, 2, 0, 1))), (2, 3, 3), id="pad-constant"),
]


@pytest.mark.parametrize("body,shape,kw", CONV_CASES + POOL_CASES + ACTIVATION_CASES + INDEXING_CASES)
def test_lowered_gradient_matches_torch(body, shape, kw, tmp_path):
    torch.manual_seed(2)
    module = Head(body(), shape)
    for m in module.modules():  # BatchNorm with non-trivial running statistics
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    check_module(module, shape, tmp_path, **kw)


def _onnx_conv_same(tmp_path, auto_pad):
    """A Conv with auto_pad (torch never writes it): the reference is torch with explicit F.pad."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    fc = rng.normal(size=(4 * 3 * 3, 4)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["input", "w"], ["c"], auto_pad=auto_pad, strides=[2, 2]),
            helper.make_node("Flatten", ["c"], ["f"]),
            helper.make_node("MatMul", ["f", "fc"], ["logits"]),
        ],
        "same",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 6, 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(fc, "fc")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path = tmp_path / f"{auto_pad}.onnx"
    onnx.save(model, path)
    # 6 -> 3 with k=3, s=2: total pad 1; SAME_UPPER puts it at the end, SAME_LOWER at the start
    pads = (0, 1, 0, 1) if auto_pad == "SAME_UPPER" else (1, 0, 1, 0)
    wt, fct = torch.tensor(w), torch.tensor(fc)
    return path, lambda x: F.conv2d(F.pad(x, pads), wt, stride=2).flatten(1) @ fct


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
def test_conv_auto_pad_same(auto_pad, tmp_path):
    import engine
    from tests.gradcheck import relative_error, torch_gradient

    path, ref = _onnx_conv_same(tmp_path, auto_pad)
    clf = engine.load(path, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).uniform(-1, 1, (3, 3, 6, 6)).astype(np.float32)
    target = np.array([0, 1, 3])
    _, grads = clf.gradient(x, target)
    _, ref_grads = torch_gradient(ref, x, target)
    assert relative_error(grads, ref_grads) <= 1e-5
    check = clf._compiled[("gradient", None)][1].self_check
    assert check["status"] == "skipped" and "auto_pad" in check["reason"]
