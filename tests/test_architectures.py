"""A representative subset of the real-architecture sweep (bench/architectures.py, `make sweep`):
real torchvision, timm and Keras architectures with seeded random weights, exported with our
exporters and compiled, their input gradients against torch autograd (and a float64 torch copy)
or tf.GradientTape, relative to the gradient's scale. The subset covers plain and depthwise
convolutions with squeeze-excitation and hard-swish, attention with LayerNorm and GELU,
cross-covariance attention (the DivGrad lowering) and the Keras path."""

from __future__ import annotations

import pytest

from bench.architectures import TOL, Arch, run_one  # stubs torchvision._meta_registrations first

# torch.jit's tracer warns about Python-number conversions in timm's shape code; the exporter's
# parity check proves the traced graph reproduces the model on the input size it was traced at.
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor:Warning")

SUBSET = [
    Arch("torchvision", "squeezenet1_1", 64),  # plain conv, concat, ceil-mode max pool
    Arch("torchvision", "mobilenet_v3_small", 32),  # depthwise, squeeze-excitation, hard-swish
    Arch("timm", "vit_tiny_patch16_224", 32, {"img_size": 32}),  # attention, LayerNorm, GELU
    Arch("timm", "convnext_atto", 32),  # depthwise 7x7, channels-last LayerNorm
    Arch("timm", "edgenext_xx_small", 64),  # cross-covariance attention: DivGrad
    Arch("keras", "MobileNetV3Small", 32),  # tf2onnx's graph, preprocessing inside the model
]


@pytest.fixture
def single_thread():
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # run_one pins torch to one thread; give the suite its own back


@pytest.mark.slow
@pytest.mark.parametrize("arch", SUBSET, ids=lambda a: a.key)
def test_architecture_gradients_match_framework(arch, tmp_path, single_thread):
    pytest.importorskip("tensorflow" if arch.source == "keras" else arch.source)
    res = run_one(arch, tmp_path)
    assert res.exported and res.compiled, f"{res.stage}: {res.reason}"
    assert res.self_check == "passed", res.self_check
    assert res.score_err <= 1e-5, res.score_err
    assert res.err_framework <= TOL, f"{arch.key}: {res.err_framework:.3g} of scale vs the framework"
    if arch.source != "keras":
        # the float64 reference bounds the framework's own rounding too
        assert res.err_float64 <= TOL, f"{arch.key}: {res.err_float64:.3g} of scale vs float64"
        assert res.framework_vs_float64 <= TOL
    assert res.matched
