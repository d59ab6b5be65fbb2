"""Compare two ONNX classifiers of the same task: first their predictions, then their explanations.

Typical pairs: the same network exported from two frameworks (they should agree to float
rounding), a port with a bug (Keras' BatchNormalization epsilon 1e-3 for PyTorch's 1e-5), a float
model and its int8 copy. Model agreement: max |logit difference| (absolute and relative to the
logit scale), top-1 agreement, mean KL(p_a || p_b). Explanation agreement, per image, of the 2-D
heatmaps (Σ|channels|): Spearman rank correlation, top-k intersection (the share of the top
``top_fraction`` pixels both maps select), SSIM of the min-max scaled maps (Wang et al. 2004,
engine.metrics.ssim), and max |map difference| relative to the larger map's scale.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.stats import spearmanr

from .errors import InputError
from .metrics.ssim import ssim
from .postprocess import min_max


@dataclass
class ModelAgreement:
    max_abs_logit_diff: float
    relative_logit_diff: float  # / max |logits| of model a
    top1_agreement: float
    mean_kl: float
    per_image_max_abs_logit_diff: list[float] = field(default_factory=list)
    top1_a: list[int] = field(default_factory=list)
    top1_b: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def model_agreement(a, b, x: np.ndarray, x_b: np.ndarray | None = None) -> ModelAgreement:
    """How far two classifiers' predictions agree on ``x``; ``x_b``: the same images in b's own
    layout when it differs (a PyTorch NCHW export against a Keras NHWC one)."""
    if a.num_classes != b.num_classes:
        raise InputError(f"the models have {a.num_classes} and {b.num_classes} classes: not the same task")
    return logit_agreement(a.predict(x), b.predict(x if x_b is None else x_b))


def logit_agreement(za: np.ndarray, zb: np.ndarray) -> ModelAgreement:
    """The model agreement measures from two models' logits (N, K) for the same images."""
    za, zb = np.asarray(za, np.float64), np.asarray(zb, np.float64)
    if za.shape != zb.shape:
        raise InputError(f"the two models' logits differ in shape: {za.shape} and {zb.shape}")
    pa, pb = _softmax(za), _softmax(zb)
    kl = (pa * (np.log(np.maximum(pa, 1e-300)) - np.log(np.maximum(pb, 1e-300)))).sum(axis=1)
    diff = np.abs(za - zb).max(axis=1)
    return ModelAgreement(
        max_abs_logit_diff=float(diff.max()),
        relative_logit_diff=float(diff.max() / max(np.abs(za).max(), 1e-30)),
        top1_agreement=float((za.argmax(1) == zb.argmax(1)).mean()),
        mean_kl=float(kl.mean()),
        per_image_max_abs_logit_diff=diff.tolist(),
        top1_a=za.argmax(1).tolist(),
        top1_b=zb.argmax(1).tolist(),
    )


def heatmaps(maps: np.ndarray, layout: str | None) -> np.ndarray:
    """(N, H, W): Σ over channels of |map| (maps already 2-D per image are taken as they are)."""
    m = np.abs(np.asarray(maps, np.float64))
    if m.ndim == 4:
        return m.sum(axis=1 if layout == "NCHW" else -1)
    if m.ndim == 3:
        return m
    raise InputError(f"maps must be (N, C, H, W), (N, H, W, C) or (N, H, W); got {m.shape}")


def explanation_agreement(
    maps_a: np.ndarray, maps_b: np.ndarray, layout: str | None, *, top_fraction: float = 0.05
) -> list[dict]:
    """One dict per image: spearman, top_k_intersection, ssim, max_abs_diff_relative."""
    if not 0 < top_fraction <= 1:
        raise InputError(f"top_fraction must be in (0, 1], got {top_fraction}")
    ha, hb = heatmaps(maps_a, layout), heatmaps(maps_b, layout)
    if ha.shape != hb.shape:
        raise InputError(f"the two methods' maps differ in shape: {ha.shape} and {hb.shape}")
    n, pixels = ha.shape[0], ha[0].size
    k = max(1, int(round(top_fraction * pixels)))
    rows = []
    scaled = []
    for i in range(n):
        fa, fb = ha[i].ravel(), hb[i].ravel()
        rho = spearmanr(fa, fb).statistic if fa.std() > 0 and fb.std() > 0 else float(np.array_equal(fa, fb))
        # Top-k by a stable sort: ties go to the lower pixel index in both maps alike.
        top_a = set(np.argsort(-fa, kind="stable")[:k].tolist())
        top_b = set(np.argsort(-fb, kind="stable")[:k].tolist())
        scale = max(fa.max(), fb.max(), 1e-30)
        rows.append(
            {
                "spearman": float(rho),
                "top_k_intersection": len(top_a & top_b) / k,
                "max_abs_diff_relative": float(np.abs(fa - fb).max() / scale),
            }
        )
        scaled.append([min_max(ha[i]), min_max(hb[i])])
    pairs = np.asarray(scaled)  # (N, 2, H, W)
    win = min(11, *(d if d % 2 else d - 1 for d in ha.shape[1:]))
    values = ssim(pairs[:, :1], pairs[:, 1:], data_range=1.0, win_size=max(win, 1))
    for row, s in zip(rows, values):
        row["ssim"] = float(s)
    return rows


def aggregate(rows: list[dict]) -> dict:
    """Mean and minimum of every per-image measure (the numeric fields of the rows)."""
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float))] if rows else []
    return {
        k: {"mean": float(np.mean([r[k] for r in rows])), "min": float(np.min([r[k] for r in rows]))}
        for k in keys
    }
