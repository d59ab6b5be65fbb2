"""The compiler and runtime as a user meets them: backward rules, Grad-CAM taps, the cache,
standalone gradient models, and every kind of bad input (clear error, no file left behind)."""

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

import engine
from engine.compile import UnsupportedModelError, compile_to_file
from engine.compile.builder import BuilderError
from engine.compile.tuning import tune_for_onnxruntime  # what an onnxruntime session runs
from engine.model import InputError
from engine.modelfile import ModelFileError
from tests.gradcheck import check_module, export, relative_error, torch_gradient

CPU = ["CPUExecutionProvider"]


def small_cnn(relu=nn.ReLU):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        relu(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        relu(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).eval()


@pytest.fixture(scope="module")
def cnn_path(tmp_path_factory):
    return export(small_cnn(), (3, 8, 8), tmp_path_factory.mktemp("cnn"))


def rule_reference(module, x, target, rule):
    """Guided backprop / DeconvNet with torch backward hooks on every ReLU and ReLU6 module."""

    def guided(mod, grad_in, grad_out):
        return (torch.relu(grad_in[0]),)

    def deconv(mod, grad_in, grad_out):
        return (torch.relu(grad_out[0]),)

    hooks = [
        m.register_full_backward_hook(guided if rule == "guided_backprop" else deconv)
        for m in module.modules()
        if isinstance(m, nn.ReLU | nn.ReLU6)
    ]
    try:
        return torch_gradient(module, x, target)[1]
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("relu", [nn.ReLU, nn.ReLU6], ids=["relu", "relu6"])
@pytest.mark.parametrize("rule", ["guided_backprop", "deconvnet"])
def test_backward_rules_match_torch_hooks(rule, relu, tmp_path):
    module = small_cnn(relu)
    clf = engine.load(export(module, (3, 8, 8), tmp_path), providers=CPU)
    x = np.random.default_rng(0).uniform(0, 6, (4, 3, 8, 8)).astype(np.float32)  # ReLU6 saturates
    target = np.array([0, 1, 2, 4])
    _, grads = clf.gradient(x, target, rule=rule)
    ref = rule_reference(module, x, target, rule)
    assert relative_error(grads, ref) <= 1e-5
    _, plain = clf.gradient(x, target)
    assert relative_error(plain, ref) > 1e-2  # the rule really changes the backward pass


def test_relu6_plain_gradient_excludes_clip_bounds(tmp_path):
    """torch's hardtanh backward treats the bounds as exclusive; the builder's own Clip gradient
    does not: inputs exactly at 0 and 6 must get zero gradient, as in torch."""
    module = nn.Sequential(nn.Flatten(), nn.ReLU6(), nn.Linear(4, 3)).eval()
    clf = engine.load(export(module, (4,), tmp_path), providers=CPU)
    x = np.array([[0.0, 6.0, 3.0, -1.0]], np.float32)
    _, grads = clf.gradient(x, 1)
    _, ref = torch_gradient(module, x, np.array([1]))
    np.testing.assert_allclose(grads, ref, rtol=1e-6, atol=1e-7)
    assert grads[0, 0] == 0 and grads[0, 1] == 0


def test_layer_gradient_matches_torch(cnn_path):
    module = small_cnn()
    clf = engine.load(cnn_path, providers=CPU)
    x = np.random.default_rng(1).uniform(0, 1, (3, 3, 8, 8)).astype(np.float32)
    target = np.array([1, 3, 0])
    for output in ("logit", "probability"):
        scores, act, grad = clf.layer_gradient(x, target, output=output)
        store = {}
        layer = module[5]  # the ReLU after the last Conv + BatchNorm: the last feature map

        def keep(mod, inputs, out, store=store):
            out.retain_grad()
            store["a"] = out

        h = layer.register_forward_hook(keep)
        xt = torch.tensor(x)
        z = module(xt)
        f = z if output == "logit" else z.softmax(-1)
        f[torch.arange(3), torch.tensor(target)].sum().backward()
        h.remove()
        assert act.shape == (3, 8, 4, 4)
        assert relative_error(act, store["a"].detach().numpy()) <= 1e-5
        assert relative_error(grad, store["a"].grad.numpy()) <= 1e-5


def test_standalone_gradient_model_needs_no_builder(cnn_path, tmp_path, monkeypatch):
    out = tmp_path / "grad.onnx"
    info = compile_to_file(cnn_path, out)
    assert info.self_check["status"] == "passed"
    model = onnx.load(out)
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    assert {i.domain for i in model.opset_import} <= {"", "ai.onnx"}
    x = np.random.default_rng(2).uniform(0, 1, (2, 3, 8, 8)).astype(np.float32)
    expected = engine.load(cnn_path, providers=CPU).gradient(x, [1, 2])[1]
    monkeypatch.setenv("ONNXPLAIN_BUILDER_PYTHON", str(tmp_path / "no-such-python"))
    clf = engine.load(cnn_path, providers=CPU, gradient_model=out)
    np.testing.assert_array_equal(clf.gradient(x, [1, 2])[1], expected)
    with pytest.raises(InputError, match="guided_backprop"):
        clf.gradient(x, [1, 2], rule="guided_backprop")


def test_gradient_model_from_another_model_is_refused(cnn_path, tmp_path):
    out = tmp_path / "grad.onnx"
    compile_to_file(cnn_path, out)
    other = export(small_cnn(nn.ReLU6), (3, 8, 8), tmp_path)
    with pytest.raises(InputError, match="different model"):
        engine.load(other, gradient_model=out)


def test_cache_builds_once(cnn_path, fresh_cache, monkeypatch):
    from engine.compile import builder

    calls = []
    real = builder.call
    monkeypatch.setattr(builder, "call", lambda req, **kw: calls.append(req["op"]) or real(req, **kw))
    x = np.zeros((1, 3, 8, 8), np.float32)
    engine.load(cnn_path, providers=CPU).gradient(x, 0)
    first = len(calls)
    engine.load(cnn_path, providers=CPU).gradient(x, 0)
    assert first >= 1 and len(calls) == first
    assert len(list((fresh_cache / "gradients").glob("*.onnx"))) == 1
    assert not list((fresh_cache / "gradients").glob("*.tmp"))


def test_chunked_batches_match_one_batch(cnn_path):
    x = np.random.default_rng(3).uniform(0, 1, (7, 3, 8, 8)).astype(np.float32)
    target = np.arange(7) % 5
    whole = engine.load(cnn_path, providers=CPU, batch_size=100)
    chunked = engine.load(cnn_path, providers=CPU, batch_size=3)
    np.testing.assert_allclose(
        chunked.gradient(x, target)[1], whole.gradient(x, target)[1], rtol=1e-6, atol=1e-9
    )
    np.testing.assert_allclose(chunked.predict(x), whole.predict(x), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------ bad input


def assert_nothing_written(cache, *paths):
    assert not list(cache.rglob("*.onnx")) and not list(cache.rglob("*.tmp"))
    for p in paths:
        assert not p.exists()
        assert not list(p.parent.glob(f".{p.name}*"))


def test_corrupt_and_truncated_files(cnn_path, tmp_path, fresh_cache):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07not a protobuf at all" * 10)
    with pytest.raises(ModelFileError, match="garbage.onnx"):
        engine.load(garbage)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(cnn_path.read_bytes()[: len(cnn_path.read_bytes()) // 2])
    with pytest.raises(ModelFileError, match="truncated.onnx"):
        engine.load(truncated)
    with pytest.raises(ModelFileError, match="no such model file"):
        engine.load(tmp_path / "missing.onnx")
    out = tmp_path / "grad.onnx"
    with pytest.raises(ModelFileError):
        compile_to_file(truncated, out)
    assert_nothing_written(fresh_cache, out)


def _two_input_model(tmp_path):
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["logits"])],
        "two",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 3]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    path = tmp_path / "two_inputs.onnx"
    onnx.save(m, path)
    return path


def test_two_inputs_and_non_classifier_output(tmp_path):
    with pytest.raises(ModelFileError, match=r"exactly one input, found 2: \['a', 'b'\]"):
        engine.load(_two_input_model(tmp_path))
    body = nn.Conv2d(3, 4, 3).eval()
    path = export(body, (3, 8, 8), tmp_path)
    with pytest.raises(ModelFileError, match="classifier output must be"):
        engine.load(path)


def test_external_data_outside_the_folder_is_refused(cnn_path, tmp_path):
    model = onnx.load(cnn_path)
    folder = tmp_path / "inner"
    folder.mkdir()
    onnx.save(
        model,
        folder / "m.onnx",
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    assert engine.load(folder / "m.onnx").num_classes == 5  # inside the folder: fine
    evil = onnx.load(folder / "m.onnx", load_external_data=False)
    (tmp_path / "secret.bin").write_bytes((folder / "weights.bin").read_bytes())
    for t in evil.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../secret.bin"
    onnx.save(evil, folder / "evil.onnx")
    with pytest.raises(ModelFileError, match="outside the model's folder"):
        engine.load(folder / "evil.onnx")


def test_bad_calls(cnn_path):
    clf = engine.load(cnn_path, providers=CPU)
    x = np.zeros((2, 3, 8, 8), np.float32)
    nan = x.copy()
    nan[1, 0, 2, 3] = np.nan
    with pytest.raises(InputError, match=r"NaN/Inf values \(first at index \(1, 0, 2, 3\)\)"):
        clf.gradient(nan, 0)
    with pytest.raises(InputError, match="looks like NHWC"):
        clf.predict(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(InputError, match="class index 5 out of range"):
        clf.gradient(x, [0, 5])
    with pytest.raises(InputError, match="one class per row"):
        clf.gradient(x, [0, 1, 2])
    with pytest.raises(InputError, match="floating point"):
        clf.predict(x.astype(np.int32))
    with pytest.raises(InputError, match="unknown output"):
        clf.gradient(x, 0, output="softmax")


def test_missing_builder_is_a_clear_error(cnn_path, tmp_path, fresh_cache, monkeypatch):
    monkeypatch.setenv("ONNXPLAIN_BUILDER_PYTHON", str(tmp_path / "nowhere" / "python"))
    clf = engine.load(cnn_path, providers=CPU)
    with pytest.raises(BuilderError, match="ONNXPLAIN_BUILDER_PYTHON"):
        clf.gradient(np.zeros((1, 3, 8, 8), np.float32), 0)
    assert_nothing_written(fresh_cache)


def test_undifferentiable_op_is_refused_with_node_and_op(tmp_path, fresh_cache):
    class Top(nn.Module):  # (Resize, the op this test used, is differentiable now)
        def forward(self, x):
            return torch.topk(x.flatten(1), 3).values

    path = export(Top(), (1, 2, 2), tmp_path)
    out = tmp_path / "grad.onnx"
    with pytest.raises(UnsupportedModelError, match=r"node '.*TopK.*' \(op TopK\)"):
        compile_to_file(path, out)
    assert_nothing_written(fresh_cache, out)


def test_cli_compile_info_predict(cnn_path, tmp_path, capsys):
    from engine.cli import main

    out = tmp_path / "g.onnx"
    assert main(["compile", str(cnn_path), "-o", str(out)]) == 0
    assert "self-check passed" in capsys.readouterr().out
    assert main(["info", str(cnn_path)]) == 0
    assert '"num_classes": 5' in capsys.readouterr().out
    assert main(["compile", str(tmp_path / "none.onnx"), "-o", str(tmp_path / "x.onnx")]) == 1  # failure
    assert "no such model file" in capsys.readouterr().err


def test_named_layer_tap_and_unknown_layer(cnn_path):
    module = small_cnn()
    clf = engine.load(cnn_path, providers=CPU)
    first_conv = next(n.output[0] for n in onnx.load(cnn_path).graph.node if n.op_type == "Conv")
    x = np.random.default_rng(5).uniform(0, 1, (2, 3, 8, 8)).astype(np.float32)
    _, act, grad = clf.layer_gradient(x, [0, 3], layer=first_conv)
    store = {}

    def keep(mod, inputs, out, store=store):
        out.retain_grad()
        store["a"] = out

    h = module[0].register_forward_hook(keep)
    z = module(torch.tensor(x))
    z[torch.arange(2), torch.tensor([0, 3])].sum().backward()
    h.remove()
    assert relative_error(act, store["a"].detach().numpy()) <= 1e-5
    assert relative_error(grad, store["a"].grad.numpy()) <= 1e-5
    with pytest.raises(ValueError, match="not a tensor of the model"):
        clf.layer_gradient(x, 0, layer="no/such/tensor")


def test_conv_masks_are_exact_at_the_clip_bounds(tmp_path):
    """The speed rewrite (activation masks as Conv+Clip, opset 13) must keep ReLU6's exclusive
    bounds: pre-activations exactly at 0 and 6, and tiny ones next to them."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.ReLU6(), nn.Flatten(), nn.Linear(8, 3)).eval()
    clf = engine.load(export(module, (2, 2, 2), tmp_path), providers=CPU)
    x = np.array([[[[0.0, 6.0], [3.0, -1.0]], [[1e-30, 6 - 4.8e-7], [7.0, -1e-30]]]], np.float32)
    _, grads = clf.gradient(x, 1)
    _, ref = torch_gradient(module, x, np.array([1]))
    np.testing.assert_array_equal(grads, ref)
    model = onnx.load_from_string(tune_for_onnxruntime(clf._compiled[("gradient", None)][0]))
    assert [i.version for i in model.opset_import if i.domain == ""] == [13]
    assert sum(n.op_type == "Conv" for n in model.graph.node) == 2  # the two mask factors


@pytest.mark.parametrize("lo,hi", [(-1.0, 1.0), (-0.5, 2.5), (0.0, 6.0)])
def test_two_sided_masks_are_exact_at_both_bounds(lo, hi, tmp_path):
    """Clip(lo, hi) masks in the two-Conv HardSigmoid form: bit-exact against torch's exclusive
    hardtanh backward at the bounds, one float32 step inside them (at least 2^-100 above lo: the
    documented limit, masks are exact unless 0 < Y − lo < 2^-101), and far from them."""
    module = nn.Sequential(nn.Hardtanh(lo, hi), nn.Flatten(), nn.Linear(12, 3)).eval()
    clf = engine.load(export(module, (3, 2, 2), tmp_path), providers=CPU)
    f32 = np.float32
    inside_lo = max(np.nextafter(f32(lo), f32(np.inf)), f32(lo + 2.0**-100))
    inside_hi = np.nextafter(f32(hi), f32(-np.inf))
    values = [
        lo,
        hi,
        inside_lo,
        inside_hi,
        lo + 1e-29,
        hi - 1e-6,
        (lo + hi) / 2,
        lo - 1,
        hi + 1,
        lo,
        hi,
        0.25,
    ]
    x = np.array(values, np.float32).reshape(1, 3, 2, 2)
    _, grads = clf.gradient(x, 2)
    _, ref = torch_gradient(module, x, np.array([2]))
    np.testing.assert_array_equal(grads, ref)
    model = onnx.load_from_string(tune_for_onnxruntime(clf._compiled[("gradient", None)][0]))
    assert sum(n.op_type == "HardSigmoid" for n in model.graph.node) == 1


def test_an_indicator_in_the_forward_graph_keeps_the_exact_mask_form(tmp_path):
    """1[lo < y < hi] computed by the model itself on an unbounded feature map y looks like a
    Clip mask but is not one: the mask rewrite must stay exact for y far outside [lo, hi]."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    fc = rng.normal(size=(8, 3)).astype(np.float32)
    scale = np.float32(10.0)
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["y"], kernel_shape=[1, 1]),
        helper.make_node("Greater", ["y", "lo"], ["gt"]),
        helper.make_node("Less", ["y", "hi"], ["lt"]),
        helper.make_node("And", ["gt", "lt"], ["inside"]),
        helper.make_node("Cast", ["inside"], ["mask"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["y", "mask"], ["kept"]),
        helper.make_node("Flatten", ["kept"], ["flat"]),
        helper.make_node("MatMul", ["flat", "fc"], ["logits"]),
    ]
    for i, node in enumerate(nodes):  # named, as exporters write them
        node.name = f"/{node.op_type}_{i}"
    graph = helper.make_graph(
        nodes,
        "indicator",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 2, 2, 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [
            numpy_helper.from_array(np.eye(2, dtype=np.float32).reshape(2, 2, 1, 1) * scale, "w"),
            numpy_helper.from_array(np.float32(0.0), "lo"),
            numpy_helper.from_array(np.float32(6.0), "hi"),
            numpy_helper.from_array(fc, "fc"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path = tmp_path / "indicator.onnx"
    onnx.save(model, path)
    clf = engine.load(path, providers=CPU)
    x = np.array([[[[-0.3, 0.2], [0.6, 4.0]], [[1e5, 0.55], [0.0, 1.3]]]], np.float32)
    y = x * scale
    inside = (y > 0) & (y < 6)
    expected = (y * inside).reshape(1, -1) @ fc
    _, grads, logits = clf.gradient(x, 1, return_logits=True)
    np.testing.assert_allclose(logits, expected, rtol=1e-6)
    np.testing.assert_allclose(
        grads.reshape(-1), np.where(inside.reshape(-1), scale * fc[:, 1], 0), rtol=1e-6
    )


def test_opset_stays_where_an_op_changed_meaning(zoo_onnx):
    clf = engine.load(zoo_onnx("tiny_vit_erf"), providers=CPU)
    clf.gradient(np.zeros((1, *clf.input_shape), np.float32), 0)
    model = onnx.load_from_string(tune_for_onnxruntime(clf._compiled[("gradient", None)][0]))
    assert [i.version for i in model.opset_import if i.domain == ""] != [13]


def _lowered_graph(clf) -> onnx.GraphProto:
    return onnx.load_from_string(tune_for_onnxruntime(clf._compiled[("gradient", None)][0])).graph


@pytest.mark.parametrize("size,tall", [(12, True), (40, False)])
def test_strided_depthwise_gradient_is_zero_insertion_and_a_conv(size, tall, tmp_path):
    """A strided depthwise ConvGrad lowers to zero insertion (a 1x1 ConvTranspose: per plane, or
    one tall single-channel image for planes up to 16x16) and a stride-1 Conv with the flipped
    kernel, never the slow grouped k x k ConvTranspose; the gradients still match torch."""
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Conv2d(3, 16, 1),
        nn.ReLU6(),
        nn.Conv2d(16, 16, 5, stride=2, padding=2, groups=16),
        nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    ).eval()
    clf, _ = check_module(module, (3, size, size), tmp_path)
    graph = _lowered_graph(clf)
    (convt,) = [n for n in graph.node if n.op_type == "ConvTranspose"]
    kernel = onnx.numpy_helper.to_array(next(i for i in graph.initializer if i.name == convt.input[1]))
    assert kernel.shape == ((1, 1, 1, 1) if tall else (16, 1, 1, 1)) and np.all(kernel == 1)
    producer = {o: n for n in graph.node for o in n.output}[convt.input[0]]
    assert (producer.op_type == "Reshape") == tall


def test_pooled_gradient_broadcast_is_an_upsample(tmp_path):
    """GlobalAveragePool's backward broadcast (Expand) becomes a nearest Resize that onnxruntime
    runs in NCHWc, behind an identity depthwise Conv; the gradient is unchanged (exact copy)."""
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)
    ).eval()
    clf, _ = check_module(module, (3, 7, 9), tmp_path)
    pool_grad = [n.op_type for n in _lowered_graph(clf).node if "GlobalAveragePool_Grad" in n.name]
    assert "Resize" in pool_grad and "Expand" not in pool_grad


def test_self_check_records_its_tolerance_and_the_error_is_within_it(cnn_path):
    from engine.compile import compile_model
    from engine.compile.selfcheck import FLOOR

    _, info = compile_model(cnn_path)
    check = info.self_check
    g = check[info.input_gradient]
    assert check["status"] == "passed" and g["tolerance"] >= FLOOR and check["depth"] > 0
    assert g["max_abs_error"] <= g["tolerance"] * g["scale"]
