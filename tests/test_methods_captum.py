"""Parity with captum 0.9 on the SAME model: a small torch CNN, exported to ONNX with
``exporters.torch.export`` and loaded with ``engine.load``; captum runs on the torch module.

Tolerance: max abs error <= 1e-5 of the map's scale (max |captum map|).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
captum_attr = pytest.importorskip("captum.attr")
exporters_torch = pytest.importorskip("exporters.torch")
engine_model = pytest.importorskip("engine.model")

from engine.methods import explain  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients"),
    pytest.mark.filterwarnings("ignore:Setting backward hooks on ReLU activations"),
]

nn = torch.nn
SHAPE = (3, 8, 8)
OUTPUT_FN = {"logit": lambda z: z, "probability": lambda z: z.softmax(-1)}


class SmallCNN(nn.Module):
    """conv → ReLU → avg-pool → conv (the Grad-CAM map: nothing between it and the flatten, so
    "the last convolutional feature map" is unambiguous) → MLP head with a ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.relu2 = nn.ReLU()
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        h = self.conv2(self.pool(self.relu1(self.conv1(x))))
        return self.fc2(self.relu2(self.fc1(h.flatten(1))))


def rel_err(ours, ref):
    if isinstance(ref, torch.Tensor):
        ref = ref.detach().numpy()
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    net = SmallCNN().eval()
    path = tmp_path_factory.mktemp("captum") / "small_cnn.onnx"
    exporters_torch.export(net, path, input_shape=SHAPE)
    clf = engine_model.load(path, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).uniform(0, 1, (3, *SHAPE)).astype(np.float32)
    target = np.array([0, 3, 4])
    return net, clf, x, target


def forward(net, output):
    return lambda inp: OUTPUT_FN[output](net(inp))


def module(net, output):
    return net if output == "logit" else nn.Sequential(net, nn.Softmax(dim=1)).eval()


@pytest.mark.parametrize("output", ["logit", "probability"])
def test_saliency_and_input_x_gradient(setup, output):
    net, clf, x, t = setup
    xt = torch.from_numpy(x)
    ref = captum_attr.Saliency(forward(net, output)).attribute(xt, target=t.tolist(), abs=False)
    assert rel_err(explain(clf, x, "saliency", target=t, output=output), ref) <= 1e-5
    ref = captum_attr.Saliency(forward(net, output)).attribute(xt, target=t.tolist())  # abs=True
    ours = explain(clf, x, "saliency", target=t, output=output, abs=True)
    assert rel_err(ours, ref) <= 1e-5
    ref = captum_attr.InputXGradient(forward(net, output)).attribute(xt, target=t.tolist())
    assert rel_err(explain(clf, x, "gradient_x_input", target=t, output=output), ref) <= 1e-5


@pytest.mark.parametrize(
    "quadrature, method",
    [
        ("gausslegendre", "gausslegendre"),
        ("left", "riemann_left"),
        ("right", "riemann_right"),
        ("midpoint", "riemann_middle"),
        ("captum_trapezoid", "riemann_trapezoid"),
    ],
)
def test_integrated_gradients(setup, quadrature, method):
    net, clf, x, t = setup
    ig = captum_attr.IntegratedGradients(forward(net, "probability"))
    ref, ref_delta = ig.attribute(
        torch.from_numpy(x), baselines=0.0, target=t.tolist(), n_steps=16, method=method,
        return_convergence_delta=True,
    )  # fmt: skip
    ours, delta = explain(
        clf, x, "integrated_gradients", target=t, steps=16, quadrature=quadrature, return_delta=True
    )
    assert rel_err(ours, ref) <= 1e-5
    np.testing.assert_allclose(delta, ref_delta.detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("nt_type, magnitude", [("smoothgrad", False), ("smoothgrad_sq", True)])
def test_noise_tunnel(setup, monkeypatch, nt_type, magnitude):
    net, clf, x, t = setup
    rng = np.random.default_rng(42)  # replay our noise: (N, samples, ...) image-major, as captum
    original = torch.normal

    def normal(mean, std, *args, **kwargs):
        if isinstance(std, torch.Tensor):
            z = torch.from_numpy(rng.standard_normal(tuple(std.shape))).to(std.dtype)
            return z * std + mean
        return original(mean, std, *args, **kwargs)

    monkeypatch.setattr(torch, "normal", normal)
    nt = captum_attr.NoiseTunnel(captum_attr.Saliency(forward(net, "probability")))
    ref = nt.attribute(
        torch.from_numpy(x), nt_type=nt_type, nt_samples=6, stdevs=0.1, target=t.tolist(),
        abs=False,
    )  # fmt: skip
    ours = explain(
        clf, x, "smoothgrad", target=t, samples=6, noise_level=0.1, noise_range="input_range",
        magnitude=magnitude, seed=42,
    )  # fmt: skip
    assert rel_err(ours, ref) <= 1e-5


@pytest.mark.parametrize("output", ["logit", "probability"])
def test_guided_backprop_and_deconvnet(setup, output):
    net, clf, x, t = setup
    xt = torch.from_numpy(x)
    ref = captum_attr.GuidedBackprop(module(net, output)).attribute(xt, target=t.tolist())
    assert rel_err(explain(clf, x, "guided_backprop", target=t, output=output), ref) <= 1e-5
    ref = captum_attr.Deconvolution(module(net, output)).attribute(xt, target=t.tolist())
    assert rel_err(explain(clf, x, "deconvnet", target=t, output=output), ref) <= 1e-5


@pytest.mark.parametrize("output", ["logit", "probability"])
@pytest.mark.parametrize("relu", [True, False])
def test_grad_cam(setup, output, relu):
    net, clf, x, t = setup
    cam = captum_attr.LayerGradCam(forward(net, output), net.conv2)
    low = cam.attribute(torch.from_numpy(x), target=t.tolist(), relu_attributions=relu)
    ref = captum_attr.LayerAttribution.interpolate(low, SHAPE[1:], "bilinear")  # (N, 1, H, W)
    ours = explain(clf, x, "grad_cam", target=t, output=output, relu=relu)
    assert ours.shape == x.shape
    assert rel_err(ours, ref.expand(-1, 3, -1, -1)) <= 1e-5
