"""ONNX files onnxplain did not export, explained with no flags (engine/adapt.py).

Reference: torch autograd on the same module — of the logits before the Softmax, of the float
image after the uint8 Cast, per row for a model exported with a fixed batch of 1.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

import engine
from engine.cli import main


def _net(softmax: bool = False, flatten_reshape: bool = False) -> nn.Module:
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 4 * 4, 5)

        def forward(self, x):
            h = torch.relu(self.conv(x))
            h = torch.nn.functional.avg_pool2d(h, 2)
            h = h.reshape(1, -1) if flatten_reshape else h.flatten(1)
            z = self.fc(h)
            return torch.softmax(z, dim=1) if softmax else z

    return Net().eval()


def _export(net, path, dynamic=True, uint8=False):
    class Bytes(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x.float())

    module = Bytes(net) if uint8 else net
    dummy = torch.zeros(1, 3, 8, 8, dtype=torch.uint8 if uint8 else torch.float32)
    torch.onnx.export(
        module,
        (dummy,),
        str(path),
        input_names=["x"],
        output_names=["y"],
        opset_version=17,
        dynamic_axes={"x": {0: "N"}, "y": {0: "N"}} if dynamic else None,
        dynamo=False,
    )
    return path


def _torch_grad(net, x, target):
    xt = torch.tensor(x, requires_grad=True)
    z = net(xt)
    z[torch.arange(len(x)), torch.as_tensor(target)].sum().backward()
    return z.detach().numpy(), xt.grad.numpy()


def _logits_net(net):
    """The same module without its final softmax (what must be explained)."""

    class Logits(nn.Module):
        def forward(self, x):
            h = torch.relu(net.conv(x))
            h = torch.nn.functional.avg_pool2d(h, 2).flatten(1)
            return net.fc(h)

    return Logits().eval()


def test_trailing_softmax_is_dropped_and_the_logits_explained(tmp_path):
    net = _net(softmax=True)
    clf = engine.load(_export(net, tmp_path / "s.onnx"))
    assert any("ends in Softmax" in n for n in clf.notes)
    assert clf.layout == "NCHW" and any("3 channels on axis 1" in n for n in clf.notes)
    x = np.random.default_rng(0).uniform(0, 1, (3, 3, 8, 8)).astype(np.float32)
    ref_logits, ref_grad = _torch_grad(_logits_net(net), x, [0, 2, 4])
    np.testing.assert_allclose(clf.predict(x), ref_logits, rtol=1e-5, atol=1e-5 * np.abs(ref_logits).max())
    _, grads = clf.gradient(x, [0, 2, 4], output="logit")
    np.testing.assert_allclose(grads, ref_grad, rtol=1e-4, atol=1e-5 * np.abs(ref_grad).max())


@pytest.mark.parametrize("flatten_reshape", [False, True])
def test_fixed_batch_one_is_made_dynamic_or_run_row_by_row(tmp_path, flatten_reshape):
    net = _net(flatten_reshape=flatten_reshape)
    path = _export(net, tmp_path / "b1.onnx", dynamic=False)
    assert onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    clf = engine.load(path)
    x = np.random.default_rng(1).uniform(0, 1, (3, 3, 8, 8)).astype(np.float32)
    refs = [_torch_grad(net, x[i : i + 1], [1]) for i in range(3)]
    ref_logits = np.concatenate([r[0] for r in refs])
    ref_grad = np.concatenate([r[1] for r in refs])
    np.testing.assert_allclose(clf.predict(x), ref_logits, rtol=1e-5, atol=1e-5 * np.abs(ref_logits).max())
    _, grads = clf.gradient(x, 1, output="logit")
    np.testing.assert_allclose(grads, ref_grad, rtol=1e-4, atol=1e-5 * np.abs(ref_grad).max())
    assert any("batch axis" in n for n in clf.notes)


def test_uint8_input_is_explained_as_the_float_image_after_the_cast(tmp_path):
    net = _net()
    clf = engine.load(_export(net, tmp_path / "u8.onnx", uint8=True))
    assert clf.input_range == (0.0, 255.0) and any("uint8" in n for n in clf.notes)
    x = np.random.default_rng(2).integers(0, 256, (2, 3, 8, 8)).astype(np.float32)
    ref_logits, ref_grad = _torch_grad(net, x, [3, 3])
    np.testing.assert_allclose(clf.predict(x), ref_logits, rtol=1e-5, atol=1e-5 * np.abs(ref_logits).max())
    _, grads = clf.gradient(x, 3, output="logit")
    np.testing.assert_allclose(grads, ref_grad, rtol=1e-4, atol=1e-5 * np.abs(ref_grad).max())


def test_an_export_without_metadata_is_explained_from_the_cli(tmp_path, capsys):
    from PIL import Image

    net = _net()
    path = _export(net, tmp_path / "bare.onnx")
    assert not onnx.load(str(path)).metadata_props
    img = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (10, 12, 3), np.uint8)).save(img)
    assert main(["info", str(path)]) == 0
    assert "layout NCHW inferred" in capsys.readouterr().out
    out = tmp_path / "maps.npz"
    assert main(["explain", str(path), str(img), "-m", "saliency", "-o", str(out), "--output", "logit"]) == 0
    data = np.load(out)
    x = data["inputs"]
    logits, _ = _torch_grad(net, x, [0])
    top = int(np.argmax(logits[0]))
    _, ref = _torch_grad(net, x, [top])
    np.testing.assert_allclose(data["attributions"], ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_a_batch_rewrite_that_breaks_the_model_falls_back_to_one_row_per_call(tmp_path):
    """A Constant-node Reshape target [1, 48] cannot serve a batch of two: the load-time check
    sees it and keeps the fixed batch, running row by row; results equal the closed form."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    w = rng.normal(0, 1, (48, 4)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node(
                "Constant", [], ["shape"], value=numpy_helper.from_array(np.array([1, 48], np.int64))
            ),
            helper.make_node("Reshape", ["x", "shape"], ["flat"], name="reshape"),
            helper.make_node("MatMul", ["flat", "W"], ["y"], name="matmul"),
        ],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[numpy_helper.from_array(w, "W")],
    )
    path = tmp_path / "c.onnx"
    path.write_bytes(
        helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8
        ).SerializeToString()
    )
    clf = engine.load(path)
    assert clf.batch_size == 1 and any("one row per runtime call" in n for n in clf.notes)
    x = rng.uniform(0, 1, (3, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(clf.predict(x), x.reshape(3, -1) @ w, rtol=1e-5, atol=1e-5)
    _, grads = clf.gradient(x, 2, output="logit")
    np.testing.assert_allclose(grads, np.broadcast_to(w[:, 2].reshape(3, 4, 4), x.shape), rtol=1e-6)


def test_layout_inference_reasons():
    from engine.adapt import infer_layout

    assert infer_layout(["N", 3, 224, 224])[0] == "NCHW"
    assert infer_layout(["N", 224, 224, 3])[0] == "NHWC"
    assert infer_layout(["N", 1, 28, 28])[0] == "NCHW"
    layout, reason = infer_layout(["N", 3, 5, 3])
    assert layout is None and "ambiguous" in reason
    assert infer_layout(["N", 100])[0] is None
