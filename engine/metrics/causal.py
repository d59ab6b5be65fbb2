"""Causal metrics: deletion and insertion curves (Petsiuk et al. 2018, RISE) with the presets of
every reference that reports them (specs/metrics.md §1–5; docs/metrics-insertion-deletion.md).

Deletion moves the most salient pixels of ``x`` to a substrate, step by step, and records the
target's score after each step; insertion starts from the substrate and puts the pixels of ``x``
back in the same order. The score of a map is an area under that curve.

Every perturbed image of every curve of every map (M maps × N images × steps) is generated in
chunks of at most ``CHUNK_BYTES`` and handed to ``model.predict`` chunk by chunk, so memory stays
flat as steps and maps grow; the clean images and the substrates, shared by all maps, are
predicted once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from engine.errors import InputError
from engine.metrics import common
from engine.metrics.base import MetricResult, metric
from engine.perturb import gaussian_blur_reflect, rise_blur, spatial_axes, upsample_bilinear

SUBSTRATES = ("blur", "black", "mean", "normalised_zero", "gaussian_blur")
AUC_RULES = ("trapezoid", "mean", "right", "trapz_dx")
UPSAMPLING = ("nearest", "bilinear")
ORDERS = ("descending", "ascending")
MODES = ("insertion", "deletion")

# Presets are data: each reproduces one reference's settings (specs/metrics.md). Explicit
# parameters override them. "paper" is the default: RISE's paper settings with the map reduced
# to 2-D by its channel sum; "rise" is RISE's evaluation code, which ranks each channel of a
# 3-channel map separately (the union behaviour, §2a) and equals "paper" on a 2-D map.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "substrate": {"insertion": "blur", "deletion": "normalised_zero"},
        "step": 224,
        "fractions": None,
        "reduce": "sum",
        "upsample": "nearest",
        "auc_rule": "trapezoid",
        "auc_dx": None,
        "score": "probability",
        "last_chunk_bug": False,
    },
    "rise": {
        "substrate": {"insertion": "blur", "deletion": "normalised_zero"},
        "step": 224,
        "fractions": None,
        "reduce": "per_channel",
        "upsample": "nearest",
        "auc_rule": "trapezoid",
        "auc_dx": None,
        "score": "probability",
        "last_chunk_bug": False,
    },
    "agi": {  # pd90506/AGI evaluator.py: black substrate both ways, raw 3-channel map, mean of 225
        "substrate": "black",
        "step": 224,
        "fractions": None,
        "reduce": "per_channel",
        "upsample": "nearest",
        "auc_rule": "mean",
        "auc_dx": None,
        "score": "probability",
        "last_chunk_bug": False,
    },
    "igos": {  # IGOS_pp methods_helper.metric: mask cells, blurred baseline, N // 50 cells a step
        "substrate": "gaussian_blur",
        "step": "igos",
        "fractions": None,
        "reduce": "sum",
        "upsample": "bilinear",
        "auc_rule": "right",
        "auc_dx": None,
        "score": "probability",
        "last_chunk_bug": False,
    },
    "idgi": {  # TMLR-IDGI metrics.insertion_score: 21 points, black, trapz(dx=0.05)
        "substrate": "black",
        "step": None,
        "fractions": np.arange(0, 1.05, 0.05),
        "reduce": "sum",
        "upsample": "nearest",
        "auc_rule": "trapz_dx",
        "auc_dx": 0.05,
        "score": "probability",
        "last_chunk_bug": False,
    },
}
PRESETS["reference_bug"] = {**PRESETS["igos"], "last_chunk_bug": True}


def _resolve(preset: str, given: dict[str, Any], mode: str) -> dict[str, Any]:
    if preset not in PRESETS:
        raise common.parameter_error("preset", preset, f"one of {tuple(PRESETS)}")
    cfg = {**PRESETS[preset], **{k: v for k, v in given.items() if v is not None}}
    if isinstance(cfg["substrate"], dict):
        cfg["substrate"] = cfg["substrate"][mode]
    return cfg


def _check(cfg: dict[str, Any]) -> None:
    checks = [
        ("reduce", common.REDUCTIONS),
        ("upsample", UPSAMPLING),
        ("auc_rule", AUC_RULES),
        ("score", common.SCORES),
        ("order", ORDERS),
    ]
    for name, allowed in checks:
        if cfg[name] not in allowed:
            raise common.parameter_error(name, cfg[name], f"one of {allowed}")
    sub = cfg["substrate"]
    if isinstance(sub, str) and sub not in SUBSTRATES:
        raise common.parameter_error("substrate", sub, f"one of {SUBSTRATES}, a number or an array")
    step = cfg["step"]
    if cfg["fractions"] is None and not (
        step == "igos" or (isinstance(step, (int, np.integer)) and not isinstance(step, bool) and step >= 1)
    ):
        raise common.parameter_error("step", step, "a positive integer (pixels per step) or 'igos'")
    if cfg["auc_dx"] is not None and not (float(cfg["auc_dx"]) > 0):
        raise common.parameter_error("auc_dx", cfg["auc_dx"], "a positive number")
    size, sigma = cfg["blur_size"], cfg["blur_sigma"]
    if not (isinstance(size, (int, np.integer)) and size >= 1 and size % 2 == 1):
        raise common.parameter_error("blur_size", size, "a positive odd integer")
    if not float(sigma) > 0:
        raise common.parameter_error("blur_sigma", sigma, "a positive number")


def _counts(cfg: dict[str, Any], cells: int) -> tuple[np.ndarray, int | None]:
    """Cells moved at each curve point (non-decreasing, 0..cells) and the resolved step."""
    if cfg["fractions"] is not None:
        f = np.asarray(cfg["fractions"], np.float64).reshape(-1)
        if f.size < 2 or not np.isfinite(f).all() or f.min() < 0 or f.max() > 1 or np.any(np.diff(f) < 0):
            raise common.parameter_error(
                "fractions", cfg["fractions"], "at least two non-decreasing numbers in [0, 1]"
            )
        return (f * cells).astype(np.int64), None  # truncation, as TMLR-IDGI's astype(int)
    step = max(1, cells // 50) if cfg["step"] == "igos" else int(cfg["step"])
    n_steps = -(-cells // step)
    return np.minimum(np.arange(n_steps + 1, dtype=np.int64) * step, cells), step


def _grid(maps: np.ndarray, resolution: Any) -> np.ndarray:
    """Average the maps over blocks down to ``resolution`` (None: keep the maps' own grid)."""
    if resolution is None:
        return maps
    rh, rw = (resolution, resolution) if np.isscalar(resolution) else tuple(resolution)
    h, w = maps.shape[-2:]
    if not (int(rh) >= 1 and int(rw) >= 1 and h % int(rh) == 0 and w % int(rw) == 0):
        raise common.parameter_error("resolution", resolution, f"a grid whose sides divide the maps' {h}×{w}")
    rh, rw = int(rh), int(rw)
    return maps.reshape(*maps.shape[:-2], rh, h // rh, rw, w // rw).mean(axis=(-3, -1))


def _ranks(maps: np.ndarray, order: str) -> np.ndarray:
    """(M, N, cells) int64: the position of each cell in the deletion order.

    Tie rule: cells of equal value go in row-major (flat index) order, lowest index first (a
    stable sort of −map, or of the map for ``order="ascending"``). With several channels
    ("per_channel") a cell is moved in the step where the first channel's ranking reaches it,
    so step i moves, in every channel, the union of each channel's top i·step cells (RISE §2a).
    """
    m, n, c = maps.shape[:3]
    flat = maps.reshape(m, n, c, -1)
    keys = -flat if order == "descending" else flat
    idx = np.argsort(keys, axis=-1, kind="stable")
    ranks = np.empty_like(idx)
    positions = np.broadcast_to(np.arange(flat.shape[-1]), idx.shape)
    np.put_along_axis(ranks, idx, positions, axis=-1)
    return ranks.min(axis=2)


def _substrate(model, x, cfg, norm) -> np.ndarray:
    sub, axes = cfg["substrate"], spatial_axes(model)
    zero = common.channel_vector(model, x, norm[0]) if norm is not None else np.zeros(1)
    if isinstance(sub, str):
        if sub == "black":
            return np.full_like(x, float(model.input_range[0]))
        if sub == "mean":
            return np.broadcast_to(x.mean(axis=axes, keepdims=True, dtype=np.float64), x.shape).astype(
                np.float32
            )
        if sub == "normalised_zero":
            return np.broadcast_to(zero, x.shape).astype(np.float32)
        if sub == "blur":
            return rise_blur(x, axes, pad=zero)
        return gaussian_blur_reflect(x, int(cfg["blur_size"]), float(cfg["blur_sigma"]), axes)
    b = np.asarray(sub, dtype=np.float32)
    if b.ndim == 0 or b.shape == x.shape[1:]:
        b = np.broadcast_to(b, x.shape)
    if b.shape != x.shape or not np.isfinite(b).all():
        raise common.parameter_error(
            "substrate", f"array {b.shape}", f"finite, shaped like x {x.shape} or one image"
        )
    return np.ascontiguousarray(b)


def auc(curve: np.ndarray, counts: np.ndarray, cells: int, rule: str, dx=None, last_chunk_bug=False) -> float:
    """Area under one curve by a named rule (specs/metrics.md §1).

    "trapezoid": RISE's ``(Σh − h₀/2 − hₙ₋₁/2)/(n − 1)`` (uniform grid over [0, 1]); "mean": Σh/n
    (AGI); "right": Σ_{i≥1} hᵢ·(countᵢ − countᵢ₋₁)/cells, the step-weighted right Riemann sum of
    IGOS_pp, whose ``last_chunk_bug`` adds the last chunk's cell count instead of hₙ₋₁ times it;
    "trapz_dx": ``np.trapezoid(h, dx=dx)`` (TMLR-IDGI, dx 0.05; default 1/(n − 1)).
    """
    h = np.asarray(curve, np.float64)
    n = len(h)
    if rule == "trapezoid":
        return float((h.sum() - h[0] / 2 - h[-1] / 2) / (n - 1))
    if rule == "mean":
        return float(h.mean())
    if rule == "trapz_dx":
        return float(np.trapezoid(h, dx=1.0 / (n - 1) if dx is None else float(dx)))
    widths = np.diff(np.asarray(counts, np.float64))
    terms = h[1:] * widths
    if last_chunk_bug:
        terms[-1] = widths[-1]
    return float(terms.sum() / cells)


def causal_curves(
    model: Any,
    x: np.ndarray,
    attributions: Any,
    target: Any = None,
    *,
    modes: Sequence[str] = MODES,
    preset: str = "paper",
    substrate: str | float | np.ndarray | None = None,
    step: int | str | None = None,
    fractions: Sequence[float] | None = None,
    reduce: str | None = None,
    resolution: int | tuple[int, int] | None = None,
    upsample: str | None = None,
    order: str = "descending",
    auc_rule: str | None = None,
    auc_dx: float | None = None,
    score: str | None = None,
    last_chunk_bug: bool | None = None,
    blur_size: int = 51,
    blur_sigma: float = 50.0,
    mean_std: Any = None,
) -> list[MetricResult]:
    """Insertion and/or deletion curves of M maps × N images in one streamed pass.

    Results: for each mode, for each map m, for each image n (in that order) one MetricResult
    whose ``extra`` holds ``map_index`` and the AUC of the other probability form
    (``auc_probability_ratio`` or ``auc_probability``). See :func:`insertion` for the parameters.
    """
    x = common.check_images(model, x)
    for mode in modes:
        if mode not in MODES:
            raise common.parameter_error("modes", modes, f"a sequence of {MODES}")
    given = {
        "substrate": substrate,
        "step": step,
        "fractions": fractions,
        "reduce": reduce,
        "upsample": upsample,
        "auc_rule": auc_rule,
        "auc_dx": auc_dx,
        "score": score,
        "last_chunk_bug": last_chunk_bug,
    }
    fixed = {"order": order, "blur_size": blur_size, "blur_sigma": blur_sigma}
    cfgs = [{**_resolve(preset, given, mode), **fixed} for mode in modes]
    for cfg in cfgs:
        if fractions is not None:  # explicit fractions win over a preset's step (and the reverse)
            cfg["step"] = None
        elif step is not None:
            cfg["fractions"] = None
        _check(cfg)
    norm = common.normalisation(model, mean_std)
    h_in, w_in = common.image_size(model, x)
    maps = common.stacked_maps(model, x, attributions)
    if len({(c["reduce"], c["upsample"]) for c in cfgs}) != 1:
        raise InputError("insertion and deletion in one pass need the same reduce and upsample")
    maps = _grid(common.reduce_channels(maps, cfgs[0]["reduce"]), resolution)
    n_maps, n = maps.shape[:2]
    h, w = maps.shape[-2:]
    cells = h * w
    ranks = _ranks(maps, order)
    per_mode = [_counts(cfg, cells) for cfg in cfgs]
    if len({tuple(c) for c, _ in per_mode}) != 1:
        raise InputError("insertion and deletion in one pass need the same steps")
    counts = per_mode[0][0]

    # shared rows: the clean images, then each mode's substrate; start/finish per mode
    subs = np.stack([_substrate(model, x, cfg, norm) for cfg in cfgs])  # (J, N, ...)
    logits0 = model.predict(np.concatenate([x, *subs]))
    tgt = common.targets(model, x, target, logits0[:n])
    kind = "logit" if cfgs[0]["score"] == "logit" else "probability"
    shared = common.scores_of(logits0, np.tile(tgt, 1 + len(modes)), kind).reshape(1 + len(modes), n)
    clean = shared[0]
    n_modes = len(modes)
    curves = np.empty((n_modes, n_maps, n, len(counts)))
    for j, mode in enumerate(modes):
        at_start, at_end = (shared[1 + j], clean) if mode == "insertion" else (clean, shared[1 + j])
        for col in np.flatnonzero(counts <= 0):
            curves[j, :, :, col] = at_start
        for col in np.flatnonzero(counts >= cells):
            curves[j, :, :, col] = at_end
    interior = np.flatnonzero((counts > 0) & (counts < cells))
    inserting = np.array([mode == "insertion" for mode in modes])  # moved cells come from x

    total = n_modes * n_maps * n * len(interior)
    rows = common.chunk_rows(model, x[0].nbytes * 4, total)
    channel_axis = 1 if model.layout == "NCHW" else -1
    full = (h, w) == (h_in, w_in)
    near_r = np.minimum((np.arange(h_in) * h) // h_in, h - 1)
    near_c = np.minimum((np.arange(w_in) * w) // w_in, w - 1)
    for begin in range(0, total, rows):
        flat = np.arange(begin, min(begin + rows, total))
        j, m, i, s = np.unravel_index(flat, (n_modes, n_maps, n, len(interior)))
        k = counts[interior[s]]
        moved = (ranks[m, i] < k[:, None]).reshape(-1, h, w)
        ins = inserting[j].reshape((-1,) + (1,) * (x.ndim - 1))
        image, sub = x[i], subs[j, i]
        if full or cfgs[0]["upsample"] == "nearest":
            if not full:
                moved = moved[:, near_r][:, :, near_c]
            batch = np.where(np.expand_dims(moved, channel_axis) == ins, image, sub)
        else:
            weight = np.expand_dims(upsample_bilinear(moved, (h_in, w_in)).astype(np.float32), channel_axis)
            weight = np.where(ins, weight, np.float32(1) - weight)  # the share of x
            batch = image * weight + sub * (np.float32(1) - weight)
        logits = model.predict(batch)
        curves[j, m, i, interior[s]] = common.scores_of(logits, tgt[i], kind)

    results = []
    for j, (mode, cfg) in enumerate(zip(modes, cfgs, strict=True)):
        record = _record(cfg, preset, per_mode[j][1], (h, w), norm)
        for mi in range(n_maps):
            for ni in range(n):
                y = curves[j, mi, ni]
                forms = {"probability": y, "probability_ratio": y / clean[ni]} if kind != "logit" else {}
                main = forms.get(cfg["score"], y)
                extra: dict[str, Any] = {"map_index": mi}
                for name, other in forms.items():
                    if name != cfg["score"]:
                        extra[f"auc_{name}"] = auc(
                            other, counts, cells, cfg["auc_rule"], cfg["auc_dx"], cfg["last_chunk_bug"]
                        )
                results.append(
                    MetricResult(
                        metric=mode,
                        score=auc(main, counts, cells, cfg["auc_rule"], cfg["auc_dx"], cfg["last_chunk_bug"]),
                        higher_is_better=mode == "insertion",
                        target=int(tgt[ni]),
                        curve_x=counts / cells,
                        curve_y=main,
                        preset=preset,
                        params=record,
                        extra=extra,
                    )
                )
    return results


def _record(cfg: dict[str, Any], preset: str, step: int | None, grid: tuple[int, int], norm) -> dict:
    rec = dict(cfg)
    rec["preset"] = preset
    rec["step"] = step
    rec["resolution"] = list(grid)
    if rec["fractions"] is not None:
        rec["fractions"] = np.asarray(rec["fractions"], np.float64).tolist()
    if not isinstance(rec["substrate"], (str, int, float)):
        rec["substrate"] = f"array {tuple(np.shape(rec['substrate']))}"
    rec["mean_std"] = None if norm is None else [norm[0].tolist(), norm[1].tolist()]
    return rec


def _public(mode: str):
    def run(
        model: Any,
        x: np.ndarray,
        attributions: Any,
        target: Any = None,
        *,
        preset: str = "paper",
        substrate: str | float | np.ndarray | None = None,
        step: int | str | None = None,
        fractions: Sequence[float] | None = None,
        reduce: str | None = None,
        resolution: int | tuple[int, int] | None = None,
        upsample: str | None = None,
        order: str = "descending",
        auc_rule: str | None = None,
        auc_dx: float | None = None,
        score: str | None = None,
        last_chunk_bug: bool | None = None,
        blur_size: int = 51,
        blur_sigma: float = 50.0,
        mean_std: Any = None,
    ) -> list[MetricResult]:
        return causal_curves(
            model,
            x,
            attributions,
            target,
            modes=(mode,),
            preset=preset,
            substrate=substrate,
            step=step,
            fractions=fractions,
            reduce=reduce,
            resolution=resolution,
            upsample=upsample,
            order=order,
            auc_rule=auc_rule,
            auc_dx=auc_dx,
            score=score,
            last_chunk_bug=last_chunk_bug,
            blur_size=blur_size,
            blur_sigma=blur_sigma,
            mean_std=mean_std,
        )

    run.__name__ = run.__qualname__ = mode
    return run


_DOC = """{title} curve and its AUC per map and image (RISE; specs/metrics.md §2–5).

    Parameters left at None take the value of ``preset`` ({presets}); the resolved value of
    every parameter is recorded in each result's ``params``.

    substrate: "blur" (RISE's 11×11 kernel, zero padding in the normalised space), "black"
    (input_range low), "mean" (each image's mean colour), "normalised_zero" (0 in the model's
    normalised space: its mean for an input in pixel space), "gaussian_blur" (OpenCV-style,
    ``blur_size`` taps, ``blur_sigma``; I-GOS's 51 / 50), a number or an array. step: cells
    moved per step ("igos": max(1, cells // 50)); fractions: the curve's points as fractions of
    the cells instead (counts truncated, as TMLR-IDGI). reduce: the channel rule ("sum",
    "abs_sum", "abs_of_sum", "max", "max_abs", "per_channel"). resolution: rank on a coarser
    grid (block means); maps smaller than the input are upsampled ("nearest" or "bilinear" with
    aligned corners, I-GOS's blend image·(1 − U) + substrate·U). order: "descending" (salient =
    high) or "ascending" (I-GOS masks, salient = low); ties go in row-major order. auc_rule:
    "trapezoid", "mean", "right" or "trapz_dx" (``auc_dx``). score: "probability" (softmax),
    "probability_ratio" (divided by the clean image's probability) or "logit".
    last_chunk_bug: IGOS_pp's last-chunk error in "right" (preset "reference_bug").
    mean_std: the model's normalisation (default from its onnxplain metadata).
    target: None (top-1 class of the clean image), a class or one per image.
    """

insertion = metric(higher_is_better=True, maps="mask")(_public("insertion"))
deletion = metric(higher_is_better=False, maps="mask")(_public("deletion"))
insertion.__doc__ = _DOC.format(title="Insertion", presets=", ".join(PRESETS))
deletion.__doc__ = _DOC.format(title="Deletion", presets=", ".join(PRESETS))

__all__ = ["PRESETS", "auc", "causal_curves", "deletion", "insertion"]
