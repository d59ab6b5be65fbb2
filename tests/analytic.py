"""Analytic numpy classifiers with closed-form gradients, implementing ``ClassifierLike``.

The way PAIR saliency tests its core: methods are checked against models whose gradients are
known exactly. Every model counts its logical calls (``calls``) and the runtime chunks they are
split into (``chunks``, ``batch_size`` rows at most), so tests can prove that methods batch.

Models: ``LinearSoftmax`` (any input shape), ``TanhNet`` and ``ReluNet`` (one hidden layer; in the
ReLU net guided backprop and DeconvNet are closed-form), ``ConvNet`` (image-shaped, NCHW or NHWC:
1×1 convolution, tanh or ReLU, 2×2 average pooling, linear head; ``layer_gradient`` exposes the
pooled feature map for Grad-CAM).
"""

from __future__ import annotations

from collections import Counter

import numpy as np


def head(logits: np.ndarray, target: np.ndarray, output: str) -> tuple[np.ndarray, np.ndarray]:
    """(score (N,), d score / d logits (N, K)) for logit, probability or log-probability, with
    ``target`` one class per row or class weights (N, K): score = Σ_k W_k · output_k."""
    if target.ndim == 2:
        weights = target.astype(np.float64)
    else:
        weights = np.zeros_like(logits)
        weights[np.arange(len(target)), target] = 1.0
    if output == "logit":
        return (weights * logits).sum(axis=1), weights
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    if output == "probability":
        score = (weights * p).sum(axis=1)
        return score, p * (weights - score[:, None])
    if output == "log_probability":
        return (weights * np.log(p)).sum(axis=1), weights - p * weights.sum(axis=1, keepdims=True)
    raise ValueError(output)


class AnalyticClassifier:
    """Base: chunking, counters, target handling. Subclasses define ``_forward`` (returning the
    logits and a cache) and ``_backward`` (d score/d logits -> d score/d x) in float64."""

    layout: str | None = None

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        *,
        batch_size: int | None = None,
        input_range: tuple[float, float] = (0.0, 1.0),
        dtype: type = np.float32,
    ) -> None:
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.input_range = input_range
        self.dtype = dtype
        self.calls: Counter = Counter()
        self.chunks: Counter = Counter()
        self.rows: Counter = Counter()

    # -- helpers -------------------------------------------------------------------------------
    def _check(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        assert x.shape[1:] == self.input_shape, (x.shape, self.input_shape)
        assert np.isfinite(x).all()
        return x.astype(np.float64)

    def _split(self, n: int) -> list[slice]:
        size = n if self.batch_size is None else self.batch_size
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    def _targets(self, target, n: int) -> np.ndarray:
        if np.ndim(target) == 2:  # class weights
            assert np.shape(target) == (n, self.num_classes)
            return np.asarray(target, dtype=np.float64)
        t = np.asarray(target, dtype=np.int64)
        t = np.full(n, int(t)) if t.ndim == 0 else t
        assert t.shape == (n,) and t.min() >= 0 and t.max() < self.num_classes
        return t

    def reset_counts(self) -> None:
        self.calls.clear()
        self.chunks.clear()
        self.rows.clear()

    # -- protocol ------------------------------------------------------------------------------
    def predict(self, x: np.ndarray) -> np.ndarray:
        x = self._check(x)
        self.calls["predict"] += 1
        self.rows["predict"] += len(x)
        out = []
        for s in self._split(len(x)):
            self.chunks["predict"] += 1
            out.append(self._forward(x[s])[0])
        return np.concatenate(out).astype(self.dtype)

    def gradient(self, x, target, output="logit", rule="gradient", *, return_logits=False):
        x = self._check(x)
        t = self._targets(target, len(x))
        self.calls["gradient"] += 1
        self.rows["gradient"] += len(x)
        scores, grads, all_logits = [], [], []
        for s in self._split(len(x)):
            self.chunks["gradient"] += 1
            logits, cache = self._forward(x[s])
            score, dlogits = head(logits, t[s], output)
            scores.append(score)
            grads.append(self._backward(cache, dlogits, rule))
            all_logits.append(logits)
        out = (np.concatenate(scores).astype(self.dtype), np.concatenate(grads).astype(self.dtype))
        return out + (np.concatenate(all_logits).astype(self.dtype),) if return_logits else out

    def layer_gradient(self, x, target, output="logit", layer=None):
        x = self._check(x)
        t = self._targets(target, len(x))
        self.calls["layer_gradient"] += 1
        logits, cache = self._forward(x)
        score, dlogits = head(logits, t, output)
        act, dact = self._layer(cache, dlogits, layer)
        return score.astype(self.dtype), act.astype(self.dtype), dact.astype(self.dtype)

    # -- closed-form score (float64), for tests --------------------------------------------------
    def score(self, x: np.ndarray, target, output: str) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        logits, _ = self._forward(x)
        return head(logits, self._targets(target, len(x)), output)[0]

    def _layer(self, cache, dlogits, layer):
        raise NotImplementedError(f"{type(self).__name__} has no feature map")


def _relu_backward(dh: np.ndarray, pre: np.ndarray, rule: str) -> np.ndarray:
    if rule == "gradient":
        return dh * (pre > 0)
    if rule == "guided_backprop":
        return dh * (pre > 0) * (dh > 0)
    if rule == "deconvnet":
        return dh * (dh > 0)
    raise ValueError(rule)


class LinearSoftmax(AnalyticClassifier):
    """logits = W·vec(x) + b."""

    def __init__(self, input_shape=(6,), num_classes=4, *, seed=0, layout=None, **kw):
        super().__init__(tuple(input_shape), num_classes, **kw)
        self.layout = layout
        rng = np.random.default_rng(seed)
        d = int(np.prod(input_shape))
        self.W = rng.normal(0, 1.0, (num_classes, d))
        self.b = rng.normal(0, 0.1, num_classes)

    def _forward(self, x):
        return x.reshape(len(x), -1) @ self.W.T + self.b, len(x)

    def _backward(self, n, dlogits, rule):
        return (dlogits @ self.W).reshape(n, *self.input_shape)


class TanhNet(AnalyticClassifier):
    """logits = W2·tanh(W1·vec(x) + b1) + b2."""

    def __init__(self, input_shape=(6,), num_classes=4, hidden=8, *, seed=0, layout=None, **kw):
        super().__init__(tuple(input_shape), num_classes, **kw)
        self.layout = layout
        rng = np.random.default_rng(seed)
        d = int(np.prod(input_shape))
        self.W1 = rng.normal(0, 1.0 / np.sqrt(d), (hidden, d)) * 2
        self.b1 = rng.normal(0, 0.1, hidden)
        self.W2 = rng.normal(0, 1.0, (num_classes, hidden))
        self.b2 = rng.normal(0, 0.1, num_classes)

    def _forward(self, x):
        h = np.tanh(x.reshape(len(x), -1) @ self.W1.T + self.b1)
        return h @ self.W2.T + self.b2, h

    def _backward(self, h, dlogits, rule):
        dx = ((dlogits @ self.W2) * (1 - h * h)) @ self.W1
        return dx.reshape(len(h), *self.input_shape)


class ReluNet(AnalyticClassifier):
    """logits = W2·relu(W1·vec(x) + b1) + b2; guided backprop / DeconvNet modify the ReLU."""

    def __init__(self, input_shape=(6,), num_classes=4, hidden=10, *, seed=0, layout=None, **kw):
        super().__init__(tuple(input_shape), num_classes, **kw)
        self.layout = layout
        rng = np.random.default_rng(seed)
        d = int(np.prod(input_shape))
        self.W1 = rng.normal(0, 1.0, (hidden, d))
        self.b1 = rng.normal(0, 0.5, hidden)
        self.W2 = rng.normal(0, 1.0, (num_classes, hidden))
        self.b2 = rng.normal(0, 0.1, num_classes)

    def _forward(self, x):
        pre = x.reshape(len(x), -1) @ self.W1.T + self.b1
        return np.maximum(pre, 0) @ self.W2.T + self.b2, pre

    def _backward(self, pre, dlogits, rule):
        dx = _relu_backward(dlogits @ self.W2, pre, rule) @ self.W1
        return dx.reshape(len(pre), *self.input_shape)


class ConvNet(AnalyticClassifier):
    """Image model: z = 1×1 conv(x) + c (F channels), u = act(z), A = 2×2 average pool of u
    (the Grad-CAM feature map), logits = W·vec(A) + b. ``layout`` "NCHW" or "NHWC"; the weights
    are the same for both layouts (an NHWC model equals the NCHW one on transposed inputs)."""

    def __init__(
        self,
        layout="NCHW",
        channels=3,
        size=(8, 8),
        features=4,
        num_classes=5,
        *,
        activation="tanh",
        seed=0,
        **kw,
    ):
        h, w = size
        assert h % 2 == 0 and w % 2 == 0
        shape = (channels, h, w) if layout == "NCHW" else (h, w, channels)
        super().__init__(shape, num_classes, **kw)
        self.layout = layout
        self.activation = activation
        rng = np.random.default_rng(seed)
        self.V = rng.normal(0, 1.0, (features, channels))
        self.c = rng.normal(0, 0.2, features)
        self.W = rng.normal(0, 1.0, (num_classes, features * (h // 2) * (w // 2))) * 0.5
        self.b = rng.normal(0, 0.1, num_classes)

    def _nchw(self, x):
        return x if self.layout == "NCHW" else x.transpose(0, 3, 1, 2)

    def _forward(self, x):
        x = self._nchw(x)
        z = np.einsum("fc,nchw->nfhw", self.V, x) + self.c[:, None, None]
        u = np.tanh(z) if self.activation == "tanh" else np.maximum(z, 0)
        n, f, h, w = u.shape
        a = u.reshape(n, f, h // 2, 2, w // 2, 2).mean(axis=(3, 5))
        return a.reshape(n, -1) @ self.W.T + self.b, (z, u, a)

    def _backward(self, cache, dlogits, rule):
        z, u, a = cache
        da = (dlogits @ self.W).reshape(a.shape)
        du = np.repeat(np.repeat(da, 2, axis=2), 2, axis=3) / 4.0
        if self.activation == "tanh":
            dz = du * (1 - u * u)
        else:
            dz = _relu_backward(du, z, rule)
        dx = np.einsum("fc,nfhw->nchw", self.V, dz)
        return dx if self.layout == "NCHW" else dx.transpose(0, 2, 3, 1)

    def excitation(self, x, target, layer=None, contrastive=True):
        """Excitation backprop in closed form (relu only): (scores, activation, g) with the MWP
        P = activation · g at the pooled map (layer None) or the input (layer "input")."""
        assert self.activation == "relu" and layer in (None, "input")
        x = self._check(x)
        t = self._targets(target, len(x))
        self.calls["excitation"] += 1
        acts, gs = [], []
        for s in self._split(len(x)):
            self.chunks["excitation"] += 1
            xs = self._nchw(x[s])
            _, (z, u, a) = self._forward(x[s])
            flat = a.reshape(len(xs), -1)

            def top(w, flat=flat, rows=t[s]):  # d P / d a at the pooled map, P(target) = 1
                wp = np.maximum(w, 0)[rows]
                zp = (wp * flat).sum(1, keepdims=True)
                return np.divide(wp, zp, out=np.zeros_like(wp), where=zp != 0)

            g_a = top(self.W) - (top(-self.W) if contrastive else 0.0)
            g_a = g_a.reshape(a.shape)
            if layer is None:
                act, g = a, g_a
            else:  # average pool: positive weights, z+ = a; ReLU passes P; the 1x1 conv: V+
                g_z = np.repeat(np.repeat(g_a, 2, axis=2), 2, axis=3) / 4.0 * (z > 0)
                xp, vp = np.maximum(xs, 0), np.maximum(self.V, 0)
                zp = np.einsum("fc,nchw->nfhw", vp, xp)
                ratio = np.divide(z, zp, out=np.zeros_like(z), where=zp != 0)
                act, g = xs, np.einsum("fc,nfhw->nchw", vp, g_z * ratio) * (xs > 0)
            if self.layout == "NHWC" and layer == "input":
                act, g = act.transpose(0, 2, 3, 1), g.transpose(0, 2, 3, 1)
            acts.append(act)
            gs.append(g)
        scores = np.zeros(len(x), self.dtype)
        return scores, np.concatenate(acts).astype(self.dtype), np.concatenate(gs).astype(self.dtype)

    def _layer(self, cache, dlogits, layer):
        assert layer in (None, "pool")
        a = cache[2]
        da = (dlogits @ self.W).reshape(a.shape)
        if self.layout == "NHWC":
            return a.transpose(0, 2, 3, 1), da.transpose(0, 2, 3, 1)
        return a, da


# Small, fast settings for every method: the sanity, batching and seed tests run all of them.
SMALL_PARAMS = {
    "saliency": {},
    "gradient_x_input": {},
    "smoothgrad": {"samples": 5},
    "integrated_gradients": {"steps": 9},
    "blur_ig": {"steps": 9, "max_sigma": 4},
    "guided_ig": {"steps": 9},
    "agi": {"classes": 3, "max_steps": 5},
    "guided_backprop": {},
    "deconvnet": {},
    "grad_cam": {},
    "igos": {"mask_size": 4, "iterations": 3, "points": 4, "blur_kernel": 5, "blur_sigma": 2.0},
    "igos_pp": {"mask_size": 4, "iterations": 3, "points": 4, "blur_kernel": 5, "blur_sigma": 2.0},
    "mask": {"mask_size": 4, "iterations": 5, "median_kernel": 3},
    "rise": {"n_masks": 200, "cells": 4, "keep_probability": 0.5},
    "occlusion": {"window": 3, "stride": 2},
    "xrai": {"steps": 9, "min_pixel_diff": 1, "segment_resize": None, "dilation_radius": 1},
    "excitation_backprop": {},
}


# Shared by the methods tests.


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


def images(model, n=3, seed=1):
    return np.random.default_rng(seed).uniform(0, 1, (n, *model.input_shape)).astype(np.float32)
