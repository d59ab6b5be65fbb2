"""Small deterministic PyTorch classifiers covering the architectures the compiler must handle.

Each builder takes ``seed`` and returns the module in eval mode; the same seed gives the same
weights on every machine. BatchNorm layers get random running statistics and affine parameters,
so a wrong BatchNorm lowering changes the logits instead of hiding behind the identity. Every
model has fewer than 50k parameters and small inputs so the test suite stays fast on a CPU.

``ZOO[name] = (builder, input_shape)``; ``export_zoo_model(name, folder)`` writes the checked
ONNX file the rest of the test suite uses.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

NUM_CLASSES = 10


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's global generator for the duration of a build, then restore its state, so
    building a model neither depends on nor disturbs the caller's random stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def randomize_batchnorm(module: nn.Module) -> None:
    """Give every BatchNorm random running statistics and affine parameters (eval mode uses
    exactly these, and the defaults 0/1 would make BatchNorm the identity)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(0.2 * torch.randn(c))
                m.running_var.copy_(torch.empty(c).uniform_(0.5, 2.0))
                m.weight.copy_(torch.empty(c).uniform_(0.5, 1.5))
                m.bias.copy_(0.2 * torch.randn(c))


def _finish(module: nn.Module) -> nn.Module:
    randomize_batchnorm(module)
    return module.eval()


def conv_bn(c_in: int, c_out: int, k: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    """Conv (no bias, "same" padding for odd k) followed by BatchNorm."""
    conv = nn.Conv2d(c_in, c_out, k, stride, padding=k // 2, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(c_out)]


# --- MLP -------------------------------------------------------------------------------------


def mlp(seed: int = 0) -> nn.Module:
    """Linear-Sigmoid-Linear-Tanh-Linear on 16 features -> 10 logits."""
    with seeded(seed):
        net = nn.Sequential(
            nn.Linear(16, 32),
            nn.Sigmoid(),
            nn.Linear(32, 32),
            nn.Tanh(),
            nn.Linear(32, NUM_CLASSES),
        )
        return _finish(net)


# --- LeNet -----------------------------------------------------------------------------------


def _lenet(pool: type[nn.Module]) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5),  # 28 -> 24
        nn.ReLU(),
        pool(2),  # -> 12
        nn.Conv2d(6, 16, 5),  # -> 8
        nn.ReLU(),
        pool(2),  # -> 4
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, NUM_CLASSES),
    )


def lenet_max(seed: int = 0) -> nn.Module:
    """LeNet-5 on (1, 28, 28) with max pooling."""
    with seeded(seed):
        return _finish(_lenet(nn.MaxPool2d))


def lenet_avg(seed: int = 0) -> nn.Module:
    """LeNet-5 on (1, 28, 28) with average pooling."""
    with seeded(seed):
        return _finish(_lenet(nn.AvgPool2d))


# --- VGG -------------------------------------------------------------------------------------


def vgg_block(seed: int = 0) -> nn.Module:
    """Two VGG stages (3x3 conv + ReLU, max pool) on (3, 32, 32), flatten, linear."""
    with seeded(seed):
        net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 32 -> 16
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # -> 8
            nn.Flatten(),
            nn.Linear(32 * 8 * 8, NUM_CLASSES),
        )
        return _finish(net)


# --- ResNet ----------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN plus shortcut, then ReLU (He et al. 2016)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(*conv_bn(c_in, c_out, 3, stride), nn.ReLU(), *conv_bn(c_out, c_out, 3))
        self.shortcut = (
            nn.Sequential(*conv_bn(c_in, c_out, 1, stride)) if stride != 1 or c_in != c_out else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    """ResNet bottleneck: 1x1 reduce, 3x3 (strided), 1x1 expand, each with BN, plus shortcut."""

    def __init__(self, c_in: int, width: int, c_out: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            *conv_bn(c_in, width, 1),
            nn.ReLU(),
            *conv_bn(width, width, 3, stride),
            nn.ReLU(),
            *conv_bn(width, c_out, 1),
        )
        self.shortcut = (
            nn.Sequential(*conv_bn(c_in, c_out, 1, stride)) if stride != 1 or c_in != c_out else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def _resnet(blocks: list[nn.Module], c_last: int) -> nn.Module:
    return nn.Sequential(
        *conv_bn(3, 16, 3),
        nn.ReLU(),
        *blocks,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(c_last, NUM_CLASSES),
    )


def resnet_basic(seed: int = 0) -> nn.Module:
    """Stem + two basic blocks (identity shortcut, then strided 1x1 projection) on (3, 32, 32).
    Export with ``keep_batchnorm=True`` to exercise the BatchNormalization prepass."""
    with seeded(seed):
        return _finish(_resnet([BasicBlock(16, 16), BasicBlock(16, 32, stride=2)], 32))


def resnet_bottleneck(seed: int = 0) -> nn.Module:
    """Stem + two bottleneck blocks (projection shortcuts, the second strided) on (3, 32, 32).
    Export with ``keep_batchnorm=True`` to exercise the BatchNormalization prepass."""
    with seeded(seed):
        blocks = [Bottleneck(16, 8, 32), Bottleneck(32, 8, 32, stride=2)]
        return _finish(_resnet(blocks, 32))


# --- MobileNetV2 -----------------------------------------------------------------------------


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand + ReLU6, 3x3 depthwise + ReLU6, linear 1x1 project,
    residual when shapes allow (Sandler et al. 2018)."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        self.body = nn.Sequential(
            *conv_bn(c_in, hidden, 1),
            nn.ReLU6(),
            *conv_bn(hidden, hidden, 3, stride, groups=hidden),
            nn.ReLU6(),
            *conv_bn(hidden, c_out, 1),
        )
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


def mobilenetv2_block(seed: int = 0) -> nn.Module:
    """Strided stem + residual and strided inverted-residual blocks on (3, 32, 32)."""
    with seeded(seed):
        net = nn.Sequential(
            *conv_bn(3, 16, 3, stride=2),
            nn.ReLU6(),
            InvertedResidual(16, 16, stride=1, expand=4),
            InvertedResidual(16, 24, stride=2, expand=4),
            *conv_bn(24, 64, 1),
            nn.ReLU6(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, NUM_CLASSES),
        )
        return _finish(net)


# --- DenseNet --------------------------------------------------------------------------------


class DenseLayer(nn.Module):
    """BN-ReLU-conv on the concatenation of all earlier features (Huang et al. 2017); the
    BatchNorm follows a Concat, so no exporter can fold it into a convolution."""

    def __init__(self, c_in: int, growth: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(c_in), nn.ReLU(), nn.Conv2d(c_in, growth, 3, padding=1, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], dim=1)


def densenet_block(seed: int = 0) -> nn.Module:
    """Stem, a 3-layer dense block (growth 8), transition (BN-ReLU-1x1-avgpool), head."""
    with seeded(seed):
        growth, c0 = 8, 16
        c1 = c0 + 3 * growth
        net = nn.Sequential(
            nn.Conv2d(3, c0, 3, padding=1, bias=False),
            DenseLayer(c0, growth),
            DenseLayer(c0 + growth, growth),
            DenseLayer(c0 + 2 * growth, growth),
            nn.BatchNorm2d(c1),
            nn.ReLU(),
            nn.Conv2d(c1, 24, 1, bias=False),
            nn.AvgPool2d(2),
            nn.BatchNorm2d(24),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(24, NUM_CLASSES),
        )
        return _finish(net)


# --- Inception -------------------------------------------------------------------------------


class InceptionBlock(nn.Module):
    """Four parallel branches concatenated on channels: 1x1; 1x1-3x3; 1x1-3x3-3x3 (the 5x5
    branch factorised); 3x3 max pool (stride 1) then 1x1 (Szegedy et al. 2015/2016)."""

    def __init__(self, c_in: int):
        super().__init__()

        def cbr(a: int, b: int, k: int) -> list[nn.Module]:
            return [*conv_bn(a, b, k), nn.ReLU()]

        self.b1 = nn.Sequential(*cbr(c_in, 8, 1))
        self.b3 = nn.Sequential(*cbr(c_in, 8, 1), *cbr(8, 12, 3))
        self.b5 = nn.Sequential(*cbr(c_in, 4, 1), *cbr(4, 8, 3), *cbr(8, 8, 3))
        self.pool = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), *cbr(c_in, 8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.pool(x)], dim=1)


def inception_block(seed: int = 0) -> nn.Module:
    """Stem (conv-BN-ReLU, max pool) + one inception block (36 channels), head, on (3, 32, 32)."""
    with seeded(seed):
        net = nn.Sequential(
            *conv_bn(3, 16, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            InceptionBlock(16),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(36, NUM_CLASSES),
        )
        return _finish(net)


# --- Vision transformer ----------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head softmax self-attention written out (so it exports as MatMul/Softmax)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (b, heads, n, head_dim)
        weights = torch.softmax(q @ k.transpose(-2, -1) * self.head_dim**-0.5, dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, d))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(LN(x)), then x + MLP(LN(x)) with GELU."""

    def __init__(self, dim: int, heads: int, gelu: str):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(approximate=gelu), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """ViT (Dosovitskiy et al. 2021) on (3, 32, 32): 8x8 patches by a strided conv, a class
    token, learned position embeddings, two blocks, LayerNorm, classify from token 0."""

    def __init__(self, gelu: str, dim: int = 32, heads: int = 4, depth: int = 2, patch: int = 8):
        super().__init__()
        n_patches = (32 // patch) ** 2
        self.patch_embedding = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.position = nn.Parameter(0.02 * torch.randn(1, n_patches + 1, dim))
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, gelu) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embedding(x).flatten(2).transpose(1, 2)  # (b, n_patches, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.position
        return self.head(self.norm(self.blocks(tokens))[:, 0])


def _randomize_layernorm(module: nn.Module) -> None:
    # Default LayerNorm affine (1, 0) would hide a missing gamma/beta in a gradient lowering.
    for m in module.modules():
        if isinstance(m, nn.LayerNorm):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)


def tiny_vit_erf(seed: int = 0) -> nn.Module:
    """TinyViT with exact (erf) GELU."""
    with seeded(seed):
        net = TinyViT(gelu="none")
        _randomize_layernorm(net)
        return _finish(net)


def tiny_vit_tanh(seed: int = 0) -> nn.Module:
    """TinyViT with tanh-approximated GELU (the builder silently gives it the erf gradient)."""
    with seeded(seed):
        net = TinyViT(gelu="tanh")
        _randomize_layernorm(net)
        return _finish(net)


# --- Text CNN --------------------------------------------------------------------------------


class TextCNN(nn.Module):
    """Kim (2014) CNN on an embedded sequence ``(N, L, D)``: Conv1d over L with widths 3 and 5,
    ReLU, max over time, concatenation, linear. The input is already embedded (float), so
    gradients with respect to it are defined."""

    def __init__(self, dim: int = 16, channels: int = 24, classes: int = 5):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv1d(dim, channels, k, padding=k // 2) for k in (3, 5)])
        self.head = nn.Linear(2 * channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.transpose(1, 2)  # (N, D, L): channels first for Conv1d
        # amax exports as ReduceMax, the op the compiler's prepass must make differentiable.
        pooled = [torch.relu(conv(x)).amax(dim=2) for conv in self.convs]
        return self.head(torch.cat(pooled, dim=1))


def text_cnn(seed: int = 0) -> nn.Module:
    """TextCNN on (20, 16) embedded sequences -> 5 logits."""
    with seeded(seed):
        return _finish(TextCNN())


# --- ReLU6 CNN (guided backprop / DeconvNet) --------------------------------------------------


RELU6_FIRST_CONV_SCALE = 32.0  # seed 0: ~11% of units above 6, ~69% below 0


def relu6_cnn(seed: int = 0) -> nn.Module:
    """Conv-ReLU6-maxpool-conv-ReLU6-GAP-linear on (3, 16, 16).

    The first convolution is scaled so a fair share of its units saturate at 6 on [0, 1]
    inputs: backward rules for ReLU6 (Clip) must then handle both bounds, not only 0.
    """
    with seeded(seed):
        net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU6(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU6(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, NUM_CLASSES),
        )
        with torch.no_grad():
            net[0].weight.mul_(RELU6_FIRST_CONV_SCALE)
            net[0].bias.mul_(RELU6_FIRST_CONV_SCALE)
        return _finish(net)


# --- Registry --------------------------------------------------------------------------------

ZOO: dict[str, tuple[Callable[..., nn.Module], tuple[int, ...]]] = {
    "mlp": (mlp, (16,)),
    "lenet_max": (lenet_max, (1, 28, 28)),
    "lenet_avg": (lenet_avg, (1, 28, 28)),
    "vgg_block": (vgg_block, (3, 32, 32)),
    "resnet_basic": (resnet_basic, (3, 32, 32)),
    "resnet_bottleneck": (resnet_bottleneck, (3, 32, 32)),
    "mobilenetv2_block": (mobilenetv2_block, (3, 32, 32)),
    "densenet_block": (densenet_block, (3, 32, 32)),
    "inception_block": (inception_block, (3, 32, 32)),
    "tiny_vit_erf": (tiny_vit_erf, (3, 32, 32)),
    "tiny_vit_tanh": (tiny_vit_tanh, (3, 32, 32)),
    "text_cnn": (text_cnn, (20, 16)),
    "relu6_cnn": (relu6_cnn, (3, 16, 16)),
}

# Exported with BatchNormalization nodes left in the graph (the compiler's BN prepass must run).
KEEP_BATCHNORM = frozenset({"resnet_basic", "resnet_bottleneck"})
# Value range of the ONNX input; embedded text is signed, images are [0, 1].
INPUT_RANGE: dict[str, tuple[float, float]] = {"text_cnn": (-1.0, 1.0)}


def build(name: str, seed: int = 0) -> nn.Module:
    """The zoo model ``name`` built with ``seed`` (eval mode)."""
    if name not in ZOO:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}")
    return ZOO[name][0](seed)


def export_zoo_model(name: str, folder: str | os.PathLike, seed: int = 0) -> Path:
    """Export zoo model ``name`` (parity-checked) to ``folder/name.onnx`` and return the path.

    Resnets keep their BatchNormalization nodes (see ``KEEP_BATCHNORM``); ``text_cnn`` takes
    inputs in [-1, 1], the others in [0, 1].
    """
    from exporters.torch import export

    path = Path(folder) / f"{name}.onnx"
    export(
        build(name, seed),
        path,
        input_shape=ZOO[name][1],
        input_range=INPUT_RANGE.get(name, (0.0, 1.0)),
        keep_batchnorm=name in KEEP_BATCHNORM,
        seed=seed,
    )
    return path
