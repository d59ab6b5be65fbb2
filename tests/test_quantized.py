"""int8 models from onnxruntime.quantization (QDQ format): gradients through the clipped
straight-through estimator, and compare of the float model against its int8 copy.

Reference: torch autograd on the same quantized graph read back from the ONNX file, with every
activation pair as torch.fake_quantize_per_tensor_affine (PyTorch's quantization-aware training
op, whose backward is the clipped straight-through estimator) and the weights dequantized.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import engine
from engine.cli import main

torch = pytest.importorskip("torch")
quantization = pytest.importorskip("onnxruntime.quantization")


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 5),
    ).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tests.gradcheck import export

    root = tmp_path_factory.mktemp("quant")
    float_path = export(_net(), (3, 16, 16), root)
    name = onnx.load(float_path).graph.input[0].name

    class Calibration(quantization.CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.batches = iter(
                [{name: rng.uniform(size=(4, 3, 16, 16)).astype(np.float32)} for _ in range(4)]
            )

        def get_next(self):
            return next(self.batches, None)

    int8_path = root / "int8.onnx"
    quantization.quantize_static(
        str(float_path),
        str(int8_path),
        Calibration(),
        quant_format=quantization.QuantFormat.QDQ,
        activation_type=quantization.QuantType.QUInt8,
        weight_type=quantization.QuantType.QInt8,
    )
    return float_path, int8_path


def _torch_qdq_forward(model: onnx.ModelProto, x):
    """Run a QDQ graph in torch: fake-quantized activations, dequantized weights."""
    inits = {
        t.name: torch.tensor(numpy_helper.to_array(t).astype(np.float64)) for t in model.graph.initializer
    }
    raw = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    env = {model.graph.input[0].name: x}

    def get(name):
        return env[name] if name in env else inits[name]

    for n in model.graph.node:
        a = {at.name: onnx.helper.get_attribute_value(at) for at in n.attribute}
        if n.op_type == "DequantizeLinear" and n.input[0] in raw:  # a weight: constant
            zp = inits[n.input[2]] if len(n.input) > 2 else 0
            scale = inits[n.input[1]]
            w = inits[n.input[0]]
            if scale.ndim == 1 and w.ndim > 1:
                shape = [1] * w.ndim
                shape[a.get("axis", 1)] = -1
                scale, zp = scale.view(shape), (zp.view(shape) if torch.is_tensor(zp) else zp)
            out = (w - zp) * scale
        elif n.op_type == "QuantizeLinear":
            zp_raw = raw[n.input[2]]
            lo, hi = (0, 255) if zp_raw.dtype == np.uint8 else (-128, 127)
            s, z = float(raw[n.input[1]]), int(zp_raw)
            out = torch.fake_quantize_per_tensor_affine(get(n.input[0]).float(), s, z, lo, hi).double()
        elif n.op_type == "DequantizeLinear":
            out = get(n.input[0])  # its QuantizeLinear already produced the dequantized value
        elif n.op_type == "Conv":
            b = get(n.input[2]) if len(n.input) > 2 else None
            pads = a.get("pads", [0, 0, 0, 0])
            out = torch.nn.functional.conv2d(
                get(n.input[0]), get(n.input[1]), b, stride=a.get("strides", [1, 1]), padding=pads[:2]
            )
        elif n.op_type == "Relu":
            out = torch.relu(get(n.input[0]))
        elif n.op_type == "MaxPool":
            out = torch.nn.functional.max_pool2d(get(n.input[0]), a["kernel_shape"], a.get("strides"))
        elif n.op_type == "GlobalAveragePool":
            out = get(n.input[0]).mean(dim=(2, 3), keepdim=True)
        elif n.op_type == "Flatten":
            out = get(n.input[0]).flatten(1)
        elif n.op_type == "Gemm":
            w = get(n.input[1])
            out = get(n.input[0]) @ (w.T if a.get("transB", 0) else w) + get(n.input[2])
        else:
            raise NotImplementedError(n.op_type)
        env[n.output[0]] = out
    return env[model.graph.output[0].name]


def test_int8_gradients_are_the_clipped_straight_through_estimator(models):
    _, int8_path = models
    model = onnx.load(int8_path)
    assert {n.op_type for n in model.graph.node} >= {"QuantizeLinear", "DequantizeLinear"}
    clf = engine.load(int8_path)
    x = np.random.default_rng(3).uniform(size=(4, 3, 16, 16)).astype(np.float32)
    target = np.array([0, 1, 2, 3])
    scores, grads = clf.gradient(x, target, output="logit")
    xt = torch.tensor(x.astype(np.float64), requires_grad=True)
    logits = _torch_qdq_forward(model, xt)
    logits[torch.arange(4), torch.as_tensor(target)].sum().backward()
    want = xt.grad.numpy()
    # Logits: onnxruntime may run the pairs as integer kernels; one quantum of the logits' scale.
    logit_scale = float(
        numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "logits_scale"))
    )
    np.testing.assert_allclose(scores, logits.detach().numpy()[np.arange(4), target], atol=1.01 * logit_scale)
    scale = np.abs(want).max()
    assert np.abs(grads - want).max() <= 1e-4 * scale
    info = clf._compiled[("gradient", None)][1]
    assert "QuantizeLinear+DequantizeLinear (straight-through)" in info.lowered_ops
    assert info.self_check["status"] == "skipped" and "QDQ" in info.self_check["reason"]


def test_compare_float_against_int8(models, tmp_path, capsys):
    from PIL import Image

    float_path, int8_path = models
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 18, 3), np.uint8)).save(photos / f"p{i}.png")
    out = tmp_path / "cmp"
    args = ["compare", str(float_path), str(int8_path), str(photos), "-m", "saliency", "-m", "occlusion"]
    args += ["--param", "occlusion.window=4", "--param", "occlusion.stride=4", "-o", str(out)]
    assert main([*args, "--json", "--output", "logit"]) == 0
    result = json.loads(capsys.readouterr().out)
    from engine.images import expand_paths, read_images

    x, _ = read_images(expand_paths([photos]), (3, 16, 16), "NCHW")
    za, zb = engine.load(float_path).predict(x), engine.load(int8_path).predict(x)
    agree = result["models_agree"]
    assert agree["max_abs_logit_diff"] == pytest.approx(np.abs(za - zb).max(), rel=1e-5)
    assert 0 < agree["max_abs_logit_diff"] < 0.1 * np.abs(za).max()  # int8 is close, not equal
    from scipy.stats import spearmanr

    a, b = engine.load(float_path), engine.load(int8_path)
    for method, kw in (("saliency", {}), ("occlusion", {"window": 4, "stride": 4})):
        rows = result["methods"][method]["per_image"]  # a gradient method and a forward-only one
        ma = engine.explain(a, x, method, target=agree["top1_a"], output="logit", **kw)
        mb = engine.explain(b, x, method, target=agree["top1_a"], output="logit", **kw)
        for i, row in enumerate(rows):
            ha, hb = np.abs(ma[i]).sum(0).ravel(), np.abs(mb[i]).sum(0).ravel()
            assert row["spearman"] == pytest.approx(spearmanr(ha, hb).statistic, abs=1e-6)
        assert all(r["spearman"] < 1.0 for r in rows)  # int8 moves the explanations
    assert (out / "report.html").exists()
