"""AGI on an exported ONNX model against an independent torch implementation of spec §8 on the
same torch module: one (image, class) and one step at a time, torch autograd for both gradients,
torch arithmetic for the iterates. Both accumulate modes and the double-softmax preset.

A smooth model (tanh, no ReLU) keeps every |∂f_a/∂x| far above float32 noise, so sign(∂f_a/∂x)
is the same in onnxruntime and torch and the two paths coincide step for step.
Tolerance: max abs error <= 1e-5 of the map's scale.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
exporters_torch = pytest.importorskip("exporters.torch")

import engine  # noqa: E402
from engine.methods import explain  # noqa: E402

nn = torch.nn
SHAPE = (3, 6, 6)
EPS, STEPS = 0.05, 6


class SmoothCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(4 * 3 * 3, 6)

    def forward(self, x):
        return self.fc(self.pool(torch.tanh(self.conv(x))).flatten(1))


def torch_agi(net, x0, label, adv_classes, accumulate, double):
    """Spec §8, written in torch: early stop before the point is used, FGSM step from x_t
    (accumulate) or from x0 (the reference code), clamp to [0, 1], acc −= ∇f_label ⊙ Δ."""
    maps, stops = [], []
    for a in adv_classes:
        xp, acc, used = x0.clone(), torch.zeros_like(x0), STEPS
        for t in range(STEPS):
            xv = xp.clone().requires_grad_(True)
            logits = net(xv)
            if int(logits.argmax(dim=1)) == a:
                used = t
                break
            p = torch.softmax(logits, dim=1)
            if double:  # AGI_quantitive.py: a Softmax-ended model, softmax applied again
                p = torch.softmax(p, dim=1)
            (g_adv,) = torch.autograd.grad(p[0, a], xv, retain_graph=True)
            (g_lab,) = torch.autograd.grad(p[0, label], xv)
            start = xp if accumulate else x0
            new = torch.clamp(start + EPS * g_adv.sign(), 0.0, 1.0)
            acc = acc - g_lab * (new - start)
            xp = new.detach()
        maps.append(acc[0])
        stops.append(used)
    return torch.stack(maps).numpy(), stops


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(3)
    net = SmoothCNN().eval()
    with torch.no_grad():  # a larger spread of logits, so that some classes flip within 6 steps
        net.fc.weight.mul_(6.0)
    path = tmp_path_factory.mktemp("agi") / "smooth_cnn.onnx"
    exporters_torch.export(net, path, input_shape=SHAPE)
    clf = engine.load(path, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(5).uniform(0, 1, (2, *SHAPE)).astype(np.float64)
    return net, clf, x.astype(np.float32)


@pytest.mark.parametrize("double", [False, True], ids=["softmax", "double-softmax"])
@pytest.mark.parametrize("accumulate", [True, False], ids=["paper", "reference-code"])
def test_agi_matches_a_torch_implementation(setup, accumulate, double):
    net, clf, x = setup
    label = clf.predict(x).argmax(axis=1)
    total, per = explain(
        clf, x, "agi", classes=list(range(6)), eps=EPS, max_steps=STEPS, accumulate=accumulate,
        double_softmax=double, return_per_class=True,
    )  # fmt: skip
    stopped = 0
    for i in range(len(x)):
        adv = [c for c in range(6) if c != label[i]]  # the explained class is never adversarial
        ref, stops = torch_agi(net, torch.from_numpy(x[i : i + 1]), int(label[i]), adv, accumulate, double)
        stopped += sum(s < STEPS for s in stops)
        scale = np.abs(ref).max()
        assert np.abs(per[i, : len(adv)] - ref).max() <= 1e-5 * scale
        assert np.abs(total[i] - ref.sum(axis=0)).max() <= 1e-5 * scale
        np.testing.assert_array_equal(per[i, len(adv) :], 0)
    if accumulate:
        assert stopped > 0  # the early stop fired somewhere and was reproduced
