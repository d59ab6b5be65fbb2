"""The model zoo and sample images: deterministic, small, and non-trivial where it matters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import images, zoo


def _state(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_zoo_models_are_deterministic_small_and_in_eval_mode(name):
    shape = zoo.ZOO[name][1]
    a, b, c = zoo.build(name, seed=0), zoo.build(name, seed=0), zoo.build(name, seed=1)
    assert not a.training
    assert sum(p.numel() for p in a.parameters()) < 50_000
    sa, sb, sc = _state(a), _state(b), _state(c)
    assert all(np.array_equal(sa[k], sb[k]) for k in sa)
    assert any(not np.array_equal(sa[k], sc[k]) for k in sa if sa[k].dtype.kind == "f")
    with torch.no_grad():
        logits = a(torch.rand(2, *shape))
    assert logits.shape[0] == 2 and torch.isfinite(logits).all()


def test_building_does_not_touch_the_global_torch_generator():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    zoo.build("resnet_basic", seed=0)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name", ["resnet_basic", "resnet_bottleneck", "densenet_block"])
def test_batchnorm_is_not_the_identity(name):
    """Random running statistics and affine parameters: resetting them changes the logits."""
    module = zoo.build(name)
    x = torch.rand(2, *zoo.ZOO[name][1])
    with torch.no_grad():
        before = module(x)
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_parameters()
                m.reset_running_stats()
        after = module(x)
    assert (before - after).abs().max() > 1e-2


def test_relu6_cnn_saturates_at_both_bounds():
    module = zoo.relu6_cnn()
    with torch.no_grad():
        pre = module[0](torch.rand(8, 3, 16, 16))
    above, below = (pre > 6).float().mean().item(), (pre < 0).float().mean().item()
    assert 0.05 < above < 0.5 and 0.2 < below < 0.9, (above, below)


def test_tiny_vit_variants_differ_only_in_gelu():
    erf, tanh = zoo.tiny_vit_erf(), zoo.tiny_vit_tanh()
    assert all(torch.equal(p, q) for p, q in zip(erf.parameters(), tanh.parameters(), strict=True))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        diff = (erf(x) - tanh(x)).abs().max().item()
    assert 0 < diff < 1e-2  # the tanh approximation is close to erf, but not equal


def test_sample_images_shapes_range_and_layouts():
    nchw, names = images.sample_images(size=64, names=("chelsea", "coffee", "camera"))
    nhwc, _ = images.sample_images(size=64, names=("chelsea", "coffee", "camera"), layout="NHWC")
    assert names == ["chelsea", "coffee", "camera"]
    assert nchw.shape == (3, 3, 64, 64) and nchw.dtype == np.float32
    assert 0.0 <= nchw.min() and nchw.max() <= 1.0 and nchw.std() > 0.1
    np.testing.assert_array_equal(nhwc, nchw.transpose(0, 2, 3, 1))
    # camera is grayscale: replicated to three equal channels
    np.testing.assert_array_equal(nchw[2, 0], nchw[2, 1])
    with pytest.raises(ValueError, match="no image"):
        images.sample_images(names=("not_a_photo",))


def test_imagenet_labels():
    from models.efficientnet import imagenet_labels

    labels = imagenet_labels()
    assert len(labels) == 1000
    assert (labels[0], labels[281], labels[967], labels[999]) == (
        "tench",
        "tabby",
        "espresso",
        "toilet tissue",
    )
