"""Sanity checks for saliency methods (Adebayo et al., NeurIPS 2018; specs/metrics.md §9).

A method whose maps barely change when the model's weights are re-drawn at random does not
explain the model (an edge detector passes any image through unchanged). ``sanity_check`` runs a
method on the trained model and on randomised copies and measures how similar the maps stay:

* **cascading** randomisation: the blocks (``engine.initializers.find_blocks``: one Conv / Gemm /
  MatMul and its normalisation each) re-drawn cumulatively from the logits towards the input, one
  record after each block;
* **independent** randomisation: one block at a time, the others kept trained;
* **data** randomisation: a second, user-supplied model (trained on permuted labels; onnxplain
  does not train) explained on the same inputs.

The randomised models are ``Classifier.with_initializers`` copies: the same compiled forward and
gradient models with new weights, nothing recompiled. Weights are re-drawn i.i.d. with each
tensor's own mean and standard deviation ("normal" or "uniform", ``engine.initializers.redraw``)
from ``default_rng([seed, block index])``; the papers used the frameworks' initialisers, which an
ONNX file does not record. The explained class is the trained model's (top-1 unless given) for
every randomised model, as in the paper.

Similarity per image (docs/sanity-checks.md): Spearman rank correlation of the channel-summed
maps ("spearman") and of the Σ|channel| maps ("spearman_abs"), SSIM of the min-max normalised
Σ|channel| maps ("ssim", ``engine.metrics.ssim``, 11-tap Gaussian window, data range 1), and the
Pearson correlation of their HOG features ("hog", scikit-image ``hog``). A method passes when the
similarity after the full cascade is below ``threshold`` (default 0.5 on "spearman_abs").
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.errors import ParameterError
from engine.metrics.base import MetricResult, metric
from engine.metrics.ssim import ssim
from engine.postprocess import min_max

if TYPE_CHECKING:
    from engine.initializers import Block

MODES = ("cascading", "independent", "data")
SIMILARITIES = ("spearman", "spearman_abs", "ssim", "hog")


# ---------------------------------------------------------------------------------- similarities
def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation per row of two (N, ...) batches: Pearson correlation of the
    ranks (ties get their average rank, as ``scipy.stats.spearmanr``). NaN for a constant row."""
    from scipy import stats  # imported here: scipy.stats takes a second to import

    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    return pearson(stats.rankdata(a, axis=1), stats.rankdata(b, axis=1))


def pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation per row of two (N, ...) batches, float64; NaN for a constant row."""
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(axis=1) / np.where(den > 0, den, 1), np.nan)


def hog_features(
    maps: np.ndarray, orientations: int = 9, pixels_per_cell: int = 8, cells_per_block: int = 2
) -> np.ndarray:
    """scikit-image ``hog`` of each 2-D map of a batch (N, H, W) -> (N, features)."""
    try:
        from skimage.feature import hog
    except ImportError as e:  # an optional dependency: only this measure needs it
        raise ParameterError("the 'hog' similarity needs scikit-image (pip install scikit-image)") from e
    h, w = maps.shape[1:]
    if min(h, w) < pixels_per_cell * cells_per_block:
        raise ParameterError(
            f"maps of {h}x{w} pixels are smaller than one HOG block "
            f"(hog_pixels_per_cell={pixels_per_cell} x hog_cells_per_block={cells_per_block})"
        )
    return np.stack(
        [
            hog(
                m,
                orientations=orientations,
                pixels_per_cell=(pixels_per_cell, pixels_per_cell),
                cells_per_block=(cells_per_block, cells_per_block),
                feature_vector=True,
            )
            for m in maps
        ]
    )


def _two_d(maps: np.ndarray, layout: str | None, absolute: bool) -> np.ndarray:
    """(N, H, W) float64 from maps shaped like the input (channels summed) or already 2-D."""
    m = np.asarray(maps, np.float64)
    if absolute:
        m = np.abs(m)
    if m.ndim == 3:
        return m
    if m.ndim != 4:
        raise ParameterError(f"maps must be (N, H, W) or shaped like an image batch; got {m.shape}")
    return m.sum(axis=1 if layout == "NCHW" else -1)


def similarities(
    reference: np.ndarray,
    maps: np.ndarray,
    layout: str | None,
    measures: Sequence[str] = SIMILARITIES,
    *,
    hog_orientations: int = 9,
    hog_pixels_per_cell: int = 8,
    hog_cells_per_block: int = 2,
) -> dict[str, np.ndarray]:
    """Each similarity measure per image (N,) between two batches of maps."""
    unknown = [m for m in measures if m not in SIMILARITIES]
    if unknown:
        raise ParameterError(f"unknown similarity {unknown}; known: {', '.join(SIMILARITIES)}")
    out: dict[str, np.ndarray] = {}
    if "spearman" in measures:
        out["spearman"] = spearman(_two_d(reference, layout, False), _two_d(maps, layout, False))
    if "spearman_abs" in measures:
        out["spearman_abs"] = spearman(_two_d(reference, layout, True), _two_d(maps, layout, True))
    if "ssim" in measures or "hog" in measures:
        a = np.stack([min_max(m) for m in _two_d(reference, layout, True)])
        b = np.stack([min_max(m) for m in _two_d(maps, layout, True)])
        if "ssim" in measures:
            out["ssim"] = ssim(a[:, None], b[:, None], data_range=1.0)
        if "hog" in measures:
            kw = dict(
                orientations=hog_orientations,
                pixels_per_cell=hog_pixels_per_cell,
                cells_per_block=hog_cells_per_block,
            )
            out["hog"] = pearson(hog_features(a, **kw), hog_features(b, **kw))
    return out


# ---------------------------------------------------------------------------------- the check
@dataclass
class SanityRecord:
    """One randomised model: which blocks were re-drawn and how similar its maps stayed.

    mode: "cascading", "independent" or "data"; step: 1.. within the mode; block: the block
    re-drawn at this step (None for data); randomised: every block re-drawn in this model;
    similarity: measure -> (N,) per image."""

    mode: str
    step: int
    block: str | None
    randomised: tuple[str, ...]
    similarity: dict[str, np.ndarray]

    def mean(self) -> dict[str, float]:
        """Each measure averaged over the images (NaN images left out)."""
        return {
            k: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
            for k, v in self.similarity.items()
        }


@dataclass
class SanityReport:
    """The result of ``sanity_check``: the original maps and one record per randomised model.
    settings: distribution, seed, output, modes, and "redrawn_from": each re-drawn tensor's
    original mean and standard deviation (the parameters of its new distribution)."""

    method: str
    params: dict[str, Any]
    target: np.ndarray
    blocks: list[Block]
    records: list[SanityRecord]
    maps: np.ndarray
    threshold: float
    measure: str
    settings: dict[str, Any] = field(default_factory=dict)

    def final(self, mode: str = "cascading") -> SanityRecord | None:
        """The last record of ``mode`` (the fully randomised model for "cascading")."""
        found = [r for r in self.records if r.mode == mode]
        return found[-1] if found else None

    @property
    def passed(self) -> bool:
        """Whether the maps of the fully randomised model (and of the data-randomised one, if
        given) are dissimilar: mean ``measure`` below ``threshold`` for each."""
        finals = [r for r in (self.final("cascading"), self.final("data")) if r is not None]
        if not finals:
            raise ParameterError("no cascading or data randomisation was run: nothing to judge")
        return all(r.mean()[self.measure] < self.threshold for r in finals)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "params": self.params,
            "target": self.target.tolist(),
            "blocks": [{"name": b.name, "op": b.op, "weights": list(b.weights)} for b in self.blocks],
            "records": [
                {
                    "mode": r.mode,
                    "step": r.step,
                    "block": r.block,
                    "randomised": list(r.randomised),
                    "similarity": {k: v.tolist() for k, v in r.similarity.items()},
                }
                for r in self.records
            ],
            "threshold": self.threshold,
            "measure": self.measure,
            "passed": self.passed if (self.final("cascading") or self.final("data")) else None,
            **self.settings,
        }


def _run(method, model, x, target, output, params) -> np.ndarray:
    if callable(method):
        return np.asarray(method(model, x, target, output=output, **params))
    from engine.methods import explain  # metrics never import a method's internals

    out = explain(model, x, method, target=target, output=output, **params)
    return np.asarray(out[0] if isinstance(out, tuple) else out)


def _select(blocks: list[Block], wanted: Sequence[str | int] | None) -> list[Block]:
    if wanted is None:
        return blocks
    by_name = {b.name: b for b in blocks}
    out = []
    for w in wanted:
        if isinstance(w, (int, np.integer)) and not isinstance(w, bool):
            if not -len(blocks) <= w < len(blocks):
                raise ParameterError(f"blocks: index {w} out of range (the model has {len(blocks)} blocks)")
            out.append(blocks[w])
        elif w in by_name:
            out.append(by_name[w])
        else:
            raise ParameterError(f"blocks: {w!r} is not a block of the model; blocks: {list(by_name)[:10]}")
    return sorted(dict.fromkeys(out), key=lambda b: b.index)


def sanity_check(
    model: Any,
    x: np.ndarray,
    method: str | Callable[..., np.ndarray],
    *,
    target: Any = None,
    output: str = "probability",
    params: Mapping[str, Any] | None = None,
    modes: Sequence[str] = ("cascading", "independent"),
    blocks: Sequence[str | int] | None = None,
    distribution: str = "normal",
    seed: int = 0,
    data_model: Any = None,
    measures: Sequence[str] = SIMILARITIES,
    measure: str = "spearman_abs",
    threshold: float = 0.5,
    maps: np.ndarray | None = None,
    hog_orientations: int = 9,
    hog_pixels_per_cell: int = 8,
    hog_cells_per_block: int = 2,
) -> SanityReport:
    """Model-parameter (and data) randomisation test of ``method`` on a batch ``x``.

    model: a Classifier or an ONNX path (its weights are replaced with ``with_initializers``).
    method: a name in ``engine.METHODS`` or a callable ``fn(model, x, target, output=..., **params)``.
    params: the method's parameters. modes: any of "cascading", "independent", "data" ("data"
    needs ``data_model``, a model of the same input and classes). blocks: the blocks to randomise
    (names or indices into ``find_blocks``; default all). distribution, seed: the re-draw
    (``engine.initializers.redraw``). measures: the similarities computed; ``measure`` and
    ``threshold`` decide ``passed``. maps: the method's maps on the trained model, if already
    computed. Costs one method run per record (cascading and independent: one per block each).
    """
    if isinstance(model, (str, os.PathLike)):
        from engine.model import load  # here: onnxruntime only when a path is given

        model = load(model)
    if isinstance(data_model, (str, os.PathLike)):
        from engine.model import load

        data_model = load(data_model)
    params = dict(params or {})
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ParameterError(f"modes must be a non-empty subset of {MODES}, got {list(modes)}")
    if measure not in measures:
        raise ParameterError(f"measure {measure!r} must be one of the computed measures {list(measures)}")
    if not (isinstance(threshold, (int, float)) and np.isfinite(threshold)):
        raise ParameterError(f"threshold must be a finite number, got {threshold!r}")
    if "data" in modes and data_model is None:
        raise ParameterError("mode 'data' needs data_model: a copy of the model trained on permuted labels")
    if data_model is not None and "data" not in modes:
        modes = (*modes, "data")
    needs_weights = any(m in modes for m in ("cascading", "independent"))
    # imported here: it pulls in onnx and the compiler's formulas, which data mode never needs
    from engine.initializers import find_blocks, initializer_values, redraw

    if needs_weights and not hasattr(model, "with_initializers"):
        raise ParameterError(
            f"model-parameter randomisation needs a Classifier (engine.load) whose weights can be "
            f"replaced; got {type(model).__name__}"
        )
    from engine.methods.common import check_input, resolve_target

    x = check_input(model, x)
    target = resolve_target(model, x, target)
    if maps is None:
        maps = _run(method, model, x, target, output, params)
    layout = getattr(model, "layout", None)
    kw = dict(
        hog_orientations=hog_orientations,
        hog_pixels_per_cell=hog_pixels_per_cell,
        hog_cells_per_block=hog_cells_per_block,
    )

    all_blocks: list[Block] = []
    chosen: list[Block] = []
    drawn: dict[str, dict[str, float]] = {}
    records: list[SanityRecord] = []
    if needs_weights:
        proto = model.onnx_model
        all_blocks = find_blocks(proto)
        if not all_blocks:
            raise ParameterError("the model has no Conv/Gemm/MatMul with weights to randomise")
        chosen = _select(all_blocks, blocks)
        values = initializer_values(proto)
        new = {b.name: redraw(values, b, distribution=distribution, seed=seed) for b in chosen}
        # the distribution each tensor was re-drawn from, recorded with the result
        drawn = {
            name: {
                "mean": float(values[name].mean(dtype=np.float64)),
                "std": float(values[name].std(dtype=np.float64)),
            }
            for b in chosen
            for name in b.weights
        }

        def record(mode: str, step: int, block: Block, randomised: list[Block]) -> None:
            weights: dict[str, np.ndarray] = {}
            for b in randomised:
                weights.update(new[b.name])
            randomised_model = model.with_initializers(weights)
            out = _run(method, randomised_model, x, target, output, params)
            sim = similarities(maps, out, layout, measures, **kw)
            records.append(SanityRecord(mode, step, block.name, tuple(b.name for b in randomised), sim))

        if "cascading" in modes:
            for step, block in enumerate(reversed(chosen), start=1):
                record("cascading", step, block, chosen[len(chosen) - step :][::-1])
        if "independent" in modes:
            for step, block in enumerate(reversed(chosen), start=1):
                record("independent", step, block, [block])
    if data_model is not None:
        out = _run(method, data_model, x, target, output, params)
        records.append(SanityRecord("data", 1, None, (), similarities(maps, out, layout, measures, **kw)))
    return SanityReport(
        method=method if isinstance(method, str) else getattr(method, "__name__", repr(method)),
        params=params,
        target=target,
        blocks=chosen,
        records=records,
        maps=np.asarray(maps),
        threshold=float(threshold),
        measure=measure,
        settings={
            "distribution": distribution,
            "seed": seed,
            "output": output,
            "modes": list(modes),
            "redrawn_from": drawn,
        },
    )


@metric(higher_is_better=False, needs="gradient", maps="input")
def model_randomisation(
    model: Any,
    x: np.ndarray,
    attributions: np.ndarray | None,
    target: Any = None,
    *,
    method: str = "saliency",
    method_params: Mapping[str, Any] | None = None,
    output: str = "probability",
    blocks: Sequence[str | int] | None = None,
    distribution: str = "normal",
    seed: int = 0,
    measure: str = "spearman_abs",
    threshold: float = 0.5,
) -> list[MetricResult]:
    """The cascading randomisation as a metric: per image, score = ``measure`` between the map
    of the trained model and of the fully randomised one (lower is better: the method depends on
    the weights); the curve is the measure after each cascade step (x = blocks randomised).
    ``attributions``: the method's maps on ``x`` if already computed. extra: every measure per
    step and the block names."""
    report = sanity_check(
        model,
        x,
        method,
        target=target,
        output=output,
        params=method_params,
        modes=("cascading",),
        blocks=blocks,
        distribution=distribution,
        seed=seed,
        measure=measure,
        threshold=threshold,
        maps=attributions,
    )
    used = {
        "method": method,
        "method_params": dict(method_params or {}),
        "output": output,
        "blocks": [b.name for b in report.blocks],
        "distribution": distribution,
        "seed": seed,
        "measure": measure,
        "threshold": threshold,
    }
    steps = np.arange(1, len(report.records) + 1, dtype=np.float64)
    names = list(report.records[0].similarity)
    results = []
    for i in range(len(x)):
        curve = np.array([r.similarity[measure][i] for r in report.records])
        results.append(
            MetricResult(
                metric="model_randomisation",
                score=float(curve[-1]),
                higher_is_better=False,
                target=int(report.target[i]),
                curve_x=steps,
                curve_y=curve,
                params=used,
                extra={
                    "similarity": {k: [float(r.similarity[k][i]) for r in report.records] for k in names},
                    "block": [r.block for r in report.records],
                    "passed": bool(curve[-1] < threshold),
                },
            )
        )
    return results


__all__ = [
    "MODES",
    "SIMILARITIES",
    "SanityRecord",
    "SanityReport",
    "hog_features",
    "model_randomisation",
    "pearson",
    "sanity_check",
    "similarities",
    "spearman",
]
