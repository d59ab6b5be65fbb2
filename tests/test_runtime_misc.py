"""Provider choice, the explain command's record, and metadata round trips."""

import json

import numpy as np
import onnx
import pytest

import engine
from engine import metadata, providers
from tests.gradcheck import export


def test_cuda_is_chosen_only_when_a_device_answers(monkeypatch):
    monkeypatch.delenv("ONNXPLAIN_PROVIDERS", raising=False)
    monkeypatch.setattr(
        providers.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(providers, "cuda_device_present", lambda: True)
    assert providers.default_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(providers, "cuda_device_present", lambda: False)
    assert providers.default_providers() == ["CPUExecutionProvider"]
    monkeypatch.setattr(providers.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(providers, "cuda_device_present", lambda: True)
    assert providers.default_providers() == ["CPUExecutionProvider"]
    monkeypatch.setenv("ONNXPLAIN_PROVIDERS", "CPUExecutionProvider")
    assert providers.default_providers() == ["CPUExecutionProvider"]


def test_cuda_sessions_run_in_full_float32(monkeypatch, tmp_path):
    """TF32 would round convolution inputs to 10 mantissa bits: CUDA sessions turn it off."""
    import torch.nn as nn

    from engine import model as runtime

    seen, real = [], runtime.ort.InferenceSession

    def record(src, so, providers):
        seen.append(providers)
        return real(src, so, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(runtime.ort, "InferenceSession", record)
    clf = engine.load(
        export(nn.Sequential(nn.Linear(4, 3)), (4,), tmp_path),
        providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    clf.predict(np.zeros((1, 4), np.float32))
    assert seen == [[("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]]


def test_this_machine_reports_the_providers_in_use(tmp_path):
    import torch.nn as nn

    clf = engine.load(export(nn.Sequential(nn.Linear(4, 3)), (4,), tmp_path))
    assert clf.providers[-1] == "CPUExecutionProvider"
    if not providers.cuda_device_present():
        assert clf.providers == ["CPUExecutionProvider"]


def test_metadata_round_trip_and_bad_values():
    m = onnx.ModelProto()
    info = metadata.ModelInfo(
        layout="NHWC",
        input_range=(0.0, 255.0),
        labels=["a", "b"],
        preprocessing={"mean": [0.5]},
        source_framework="keras",
    )
    metadata.write(m, info)
    back = metadata.read(m)
    assert back.layout == "NHWC" and back.input_range == (0.0, 255.0) and back.labels == ["a", "b"]
    m.metadata_props.add(key="onnxplain.layout", value='"HWC"')
    with pytest.raises(ValueError, match="NCHW or NHWC"):
        metadata.read(m)


def test_cli_explain_writes_maps_and_a_reproducible_record(tmp_path):
    import torch
    import torch.nn as nn
    from PIL import Image

    from engine.cli import main
    from exporters import torch as torch_export

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    ).eval()
    path = tmp_path / "m.onnx"
    torch_export.export(net, path, input_shape=(3, 16, 16), labels=["x", "y", "z"])
    img = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(0).uniform(0, 255, (20, 24, 3))).astype(np.uint8)).save(img)
    out = tmp_path / "maps.npz"
    assert (
        main(
            [
                "explain",
                str(path),
                str(img),
                "-m",
                "integrated_gradients",
                "-o",
                str(out),
                "--params",
                '{"steps": 8}',
                "--target",
                "1",
            ]
        )
        == 0
    )
    data = np.load(out)
    record = json.loads(str(data["record"]))
    assert record["method"] == "integrated_gradients" and record["params_given"] == {"steps": 8}
    assert record["params"]["steps"] == 8 and record["params"]["baseline"] == "black"  # defaults too
    assert record["targets"] == [{"class": 1, "label": "y"}]
    again = engine.explain(
        engine.load(path),
        data["inputs"],
        record["method"],
        target=record["target"],
        output=record["output"],
        **record["params"],
    )
    np.testing.assert_array_equal(again, data["attributions"])
    assert main(["explain", str(path), str(img), "-m", "no_such_method", "-o", str(tmp_path / "x.npz")]) == 2
    assert not (tmp_path / "x.npz").exists()


def test_gradient_returns_the_logits_of_its_own_forward_pass(zoo_onnx):
    """return_logits hands over the gradient graph's logits: the same as predict, in every chunk,
    and the scores/gradients are those of the plain call."""
    clf = engine.load(zoo_onnx("lenet_max"), providers=["CPUExecutionProvider"], batch_size=2)
    x = np.random.default_rng(3).uniform(0, 1, (5, *clf.input_shape)).astype(np.float32)
    target = np.array([0, 1, 2, 3, 4]) % clf.num_classes
    scores, grads = clf.gradient(x, target, output="probability")
    scores2, grads2, logits = clf.gradient(x, target, output="probability", return_logits=True)
    reference = clf.predict(x)
    assert logits.shape == reference.shape == (5, clf.num_classes)
    assert np.max(np.abs(logits - reference)) <= 1e-6 * np.max(np.abs(reference))
    np.testing.assert_array_equal(scores, scores2)
    np.testing.assert_array_equal(grads, grads2)


@pytest.mark.parametrize("output", ["logit", "probability", "log_probability"])
def test_class_weight_targets_are_a_weighted_sum_of_class_gradients(zoo_onnx, output):
    """target=W (N, K) scores Σ_k W[n, k]·output_k: by linearity its gradient is the W-weighted
    sum of the one-class gradients (computed here one class at a time)."""
    clf = engine.load(zoo_onnx("lenet_max"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(4)
    x = rng.uniform(0, 1, (3, *clf.input_shape)).astype(np.float32)
    w = rng.normal(size=(3, clf.num_classes)).astype(np.float32)
    scores, grads = clf.gradient(x, w, output=output)
    ref_scores, ref_grads = np.zeros(3), np.zeros(x.shape)
    for k in range(clf.num_classes):
        s_k, g_k = clf.gradient(x, k, output=output)
        ref_scores += w[:, k] * s_k
        ref_grads += w[:, k, None, None, None] * g_k
    assert np.abs(scores - ref_scores).max() <= 1e-5 * np.abs(ref_scores).max()
    assert np.abs(grads - ref_grads).max() <= 1e-5 * np.abs(ref_grads).max()
    with pytest.raises(engine.model.InputError, match="class weights"):
        clf.gradient(x, w[:, :3], output=output)


def test_an_empty_batch_gives_empty_results_without_running_the_model(zoo_onnx):
    clf = engine.load(zoo_onnx("lenet_max"), providers=["CPUExecutionProvider"])
    x = np.zeros((0, *clf.input_shape), np.float32)
    assert clf.predict(x).shape == (0, clf.num_classes)
    scores, grads, logits = clf.gradient(x, np.zeros(0, np.int64), return_logits=True)
    assert scores.shape == (0,) and grads.shape == x.shape and logits.shape == (0, clf.num_classes)
    with pytest.raises(engine.model.InputError, match="at least one row"):
        clf.layer_gradient(x, np.zeros(0, np.int64))
