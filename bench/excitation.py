"""Contrastive excitation backprop (c-MWP) on EfficientNet-Lite0: onnxplain vs a torch MWP.

The peer is the rule written as torch autograd Functions whose backward passes probabilities
(P_in = a+ · W+ᵀ (P_out / z+) for every BatchNorm-folded convolution, the pooling and the
classifier; P split by contribution at the residual Adds; ReLU6 passing P), on the same batch:
one forward, the target's and the dual unit's P at the contrast layer (the head's feature map),
their difference carried down to the saliency layer (the normalised input). onnxplain runs
``excitation_backprop`` (one call of its compiled excitation graph for the batch, contrast taken
at the top: the same numbers by linearity).

    python -m bench.excitation [--images 8] [--layer input|auto] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import (
    DEFAULT_WORKDIR,
    Row,
    efficientnet_onnx,
    median_seconds,
    photo_batch,
    prepare_workdir,
    print_table,
    relative_difference,
    relative_l2,
    torch_efficientnet,
)

TARGET = 1.0  # no target in the issue: report the ratio


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, full, positive):
        ctx.save_for_backward(x)
        ctx.positive = positive
        return full(x)

    @staticmethod
    def backward(ctx, p_out):
        (x,) = ctx.saved_tensors
        xp = x.clamp(min=0).detach().requires_grad_(True)
        with torch.enable_grad():
            z = ctx.positive(xp)
        ratio = torch.where(z == 0, torch.zeros_like(z), p_out / z)
        (back,) = torch.autograd.grad(z, xp, ratio)
        return xp.detach() * back, None, None


class _Pass(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fn):
        return fn(x)

    @staticmethod
    def backward(ctx, p_out):
        return p_out, None


class _Add(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, v):
        ctx.save_for_backward(u, v)
        return u + v

    @staticmethod
    def backward(ctx, p_out):
        u, v = (t.clamp(min=0) for t in ctx.saved_tensors)
        z = u + v
        ratio = torch.where(z == 0, torch.zeros_like(z), p_out / z)
        return u * ratio, v * ratio


def _folded(conv, bn):
    """(full, positive): the conv module (its own "same" padding kept) with BN folded in, and its
    copy with W+ and no bias."""
    full = copy.deepcopy(conv)
    a = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(a)
    with torch.no_grad():
        full.weight.mul_(a.view(-1, 1, 1, 1))
        full.bias = torch.nn.Parameter((bias - bn.running_mean) * a + bn.bias, requires_grad=False)
    positive = copy.deepcopy(full)
    with torch.no_grad():
        positive.weight.clamp_(min=0)
    positive.bias = None
    return full, positive


class PeerMWP:
    """EfficientNet-Lite0 (efficientnet_lite_pytorch) with MWP backward rules."""

    def __init__(self, normalised):
        net = normalised.net
        self.mean, self.std = normalised.mean, normalised.std
        relu6 = torch.nn.ReLU6()
        self.stem = _folded(net._conv_stem, net._bn0)
        self.blocks = []
        for b in net._blocks:
            args = b._block_args
            self.blocks.append(
                {
                    "expand": _folded(b._expand_conv, b._bn0) if args.expand_ratio != 1 else None,
                    "depthwise": _folded(b._depthwise_conv, b._bn1),
                    "project": _folded(b._project_conv, b._bn2),
                    "skip": b.id_skip and args.stride == 1 and args.input_filters == args.output_filters,
                }
            )
        self.head = _folded(net._conv_head, net._bn1)
        self.fc = net._fc
        self.relu6 = relu6

    def _conv(self, pair, x, act=True):
        y = _Linear.apply(x, *pair)
        return _Pass.apply(y, self.relu6) if act else y

    def maps(self, x: np.ndarray, target: np.ndarray, saliency: str) -> np.ndarray:
        with torch.no_grad():
            norm = ((torch.from_numpy(x) - self.mean) / self.std).detach()
        norm.requires_grad_(True)
        h = self._conv(self.stem, norm)
        for b in self.blocks:
            inputs = h
            if b["expand"] is not None:
                h = self._conv(b["expand"], h)
            h = self._conv(b["depthwise"], h)
            h = self._conv(b["project"], h, act=False)
            if b["skip"]:
                h = _Add.apply(h, inputs)
        feature_map = self._conv(self.head, h)
        pool = torch.nn.AdaptiveAvgPool2d(1)
        pooled = _Linear.apply(feature_map, pool, pool).flatten(1)
        w_pos, w_dual = self.fc.weight.clamp(min=0), (-self.fc.weight).clamp(min=0)
        logits = _Linear.apply(pooled, self.fc, lambda t: F.linear(t, w_pos))
        dual = _Linear.apply(pooled, lambda t: F.linear(t, -self.fc.weight), lambda t: F.linear(t, w_dual))
        onehot = F.one_hot(torch.as_tensor(target), logits.shape[1]).float()
        (p_target,) = torch.autograd.grad(logits, feature_map, onehot, retain_graph=True)
        (p_dual,) = torch.autograd.grad(dual, feature_map, onehot, retain_graph=True)
        if saliency == "auto":
            p = p_target - p_dual
        else:
            (p,) = torch.autograd.grad(feature_map, norm, p_target - p_dual)
        m = p.sum(1, keepdim=True).clamp(min=0)
        m = F.interpolate(m, size=x.shape[2:], mode="bilinear", align_corners=False)
        return m.expand(-1, x.shape[1], -1, -1).detach().numpy()


def main(argv=None) -> Row:
    import engine
    from engine.methods import explain

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--layer", choices=("input", "auto"), default="input")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR)
    args = parser.parse_args(argv)
    work = prepare_workdir(args.workdir)
    torch.set_num_threads(args.threads)
    clf = engine.load(efficientnet_onnx(work), providers=["CPUExecutionProvider"], threads=args.threads)
    x = photo_batch(args.images)
    target = clf.predict(x).argmax(1)
    layer = None if args.layer == "auto" else "input"
    peer = PeerMWP(torch_efficientnet())

    def ours():
        return explain(clf, x, "excitation_backprop", target=target, layer=layer)

    ours_s, ours_map = median_seconds(ours, args.repeats)
    peer_s, peer_map = median_seconds(lambda: peer.maps(x, target, args.layer), args.repeats)
    print(
        f"c-MWP, EfficientNet-Lite0 224x224, {args.images} images, layer {args.layer}, CPU, "
        f"{args.threads} threads, median of {args.repeats}"
    )
    row = Row(
        "excitation_backprop",
        "torch MWP autograd.Function",
        ours_s,
        peer_s,
        TARGET,
        relative_difference(ours_map, peer_map),
        relative_l2(ours_map, peer_map),
    )
    print_table([row])
    print(f"ratio ours/peer: {row.ratio:.3f}")
    return row


if __name__ == "__main__":
    main()
