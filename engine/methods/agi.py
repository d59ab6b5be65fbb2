"""AGI: Adversarial Gradient Integration (Pan et al., IJCAI 2021; spec methods.md §8)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.methods.common import (
    Target,
    check_input,
    check_output,
    output_scores,
    resolve_target,
    softmax,
)
from engine.methods.idgi import idgi_step
from engine.methods.integrated_gradients import integrate_straight_path
from engine.methods.stream import chunk_rows
from engine.protocol import ClassifierLike

SELECTIONS = ("random", "spaced", "least_likely", "most_likely")
PATHS = ("steepest", "straight")


def select_classes(
    explained: np.ndarray,
    logits: np.ndarray,
    classes: int | Sequence[int],
    selection: str,
    seed: int | None,
) -> np.ndarray:
    """Adversarial classes per image, (N, k) int64, -1 marking an unused slot.

    The explained class is never selected. ``classes`` as an int k is capped at K − 1.
    "random": ONE seeded permutation of the K classes shared by all images (the reference draws
    once per run), each image taking its first k entries that differ from its explained class.
    "spaced": ``range(0, K - 1, K // k)`` minus the explained class (AGI_main.py; can give k + 1
    classes, e.g. 16 for K=1000, k=15). "least_likely" / "most_likely": by softmax(logits) at the
    input. An explicit list of ids: that list, minus the explained class.
    """
    n, num_classes = logits.shape
    if not isinstance(classes, (int, np.integer)):
        ids = np.asarray(classes, dtype=np.int64).reshape(-1)
        if ids.size == 0 or ids.min() < 0 or ids.max() >= num_classes:
            raise ValueError(f"classes must be ids in [0, {num_classes}); got {list(classes)}")
        rows = [ids[ids != c] for c in explained]
    else:
        k = min(int(classes), num_classes - 1)
        if k < 1:
            raise ValueError(f"classes must be >= 1 and K >= 2; got {classes}, K={num_classes}")
        if selection == "random":
            perm = np.random.default_rng(seed).permutation(num_classes)
            rows = [perm[perm != c][:k] for c in explained]
        elif selection == "spaced":
            ids = np.arange(0, num_classes - 1, num_classes // k)
            rows = [ids[ids != c] for c in explained]
        elif selection in ("least_likely", "most_likely"):
            order = np.argsort(logits, axis=1, kind="stable")  # softmax preserves the order
            if selection == "most_likely":
                order = order[:, ::-1]
            rows = [o[o != c][:k] for o, c in zip(order, explained, strict=True)]
        else:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    width = max(len(r) for r in rows)
    out = np.full((n, width), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


class _Objective:
    """What AGI differentiates: ``output`` of the model, or with ``double_softmax`` the score
    q = softmax(softmax(z)) of AGI_quantitive.py (a Softmax-ended model fed to pgd_step, which
    applies softmax again; spec §8). The latter is one gradient call too: class weights
    W = ∂q_c/∂z (from the logits at the same points) with output="logit" give ∂q_c/∂x."""

    def __init__(self, output: str, double_softmax: bool):
        self.output, self.double = output, double_softmax

    def scores(self, logits: np.ndarray, classes: np.ndarray) -> np.ndarray:
        if not self.double:
            return output_scores(logits, classes, self.output)
        return softmax(softmax(logits))[np.arange(len(classes)), classes]

    def gradient_target(self, logits: np.ndarray | None, classes: np.ndarray):
        """(target, output) for ``model.gradient``; the double softmax needs the logits."""
        if not self.double:
            return classes, self.output
        rows = np.arange(len(classes))
        p = softmax(logits)
        q = softmax(p)
        qc = q[rows, classes]
        a = -qc[:, None] * q  # ∂q_c/∂p = q_c (e_c − q)
        a[rows, classes] += qc
        return p * a - p * (a * p).sum(axis=1, keepdims=True), "logit"  # through the first softmax


def _path_gradients(model, pts, adv_cls, lab, objective, steepest, logits=None):
    """((∇f_adv, ∇f_lab or None), logits) at ``pts``: ONE gradient call of 2·M rows (M for the
    straight path, which needs no ∇f_lab), float64. ``logits`` at ``pts`` when already known
    (required by the double softmax)."""
    m = len(pts)
    pts = pts.astype(np.float32)
    if steepest:
        rows_x, classes = np.concatenate([pts, pts]), np.concatenate([adv_cls, lab])
        known = None if logits is None else np.concatenate([logits, logits])
    else:
        rows_x, classes, known = pts, adv_cls, logits
    target, output = objective.gradient_target(known, classes)
    _, g, out_logits = model.gradient(rows_x, target, output, return_logits=True)
    g = np.asarray(g, dtype=np.float64)
    grads = (g[:m], g[m:]) if steepest else (g, None)
    return grads, np.asarray(out_logits, dtype=np.float64)[:m]


def agi(
    model: ClassifierLike,
    x: np.ndarray,
    target: Target = None,
    *,
    output: str = "probability",
    classes: int | Sequence[int] = 20,
    eps: float = 0.05,
    max_steps: int = 20,
    selection: str = "random",
    accumulate: bool = True,
    path: str = "steepest",
    idgi: bool = False,
    return_per_class: bool = False,
    double_softmax: bool = False,
    seed: int | None = 0,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """AGI: for each adversarial class a, walk the steepest-ascent path of f_a (FGSM steps of size
    ``eps``, clipped to ``model.input_range``) and integrate −∂f_c/∂x along it; sum over classes
    (no division by k, as the reference).

    accumulate=True (paper): x_{t+1} = clip(x_t + eps·sign(∇f_a(x_t))), acc += −∇f_c(x_t) ⊙
    (x_{t+1} − x_t). accumulate=False (reference code): x_{t+1} = clip(x_0 + eps·sign(∇f_a(x_t))),
    acc += −∇f_c(x_t) ⊙ (x_{t+1} − x_0). Early stop per (image, class) when argmax f(x_t) == a,
    checked before x_t is used. Per step ONE gradient call with 2·M rows (M = pairs still running:
    the adversarial and the explained gradient), which also returns the logits for the stop check;
    a separate ``predict`` runs first only after a step where more than 1/8 of the pairs stopped.
    path="straight" (ablation): the steepest phase only locates the final adversarial point
    x_adv (gradient calls with M rows); the attribution is then IG from x_adv to x_0 for the
    explained class, right Riemann sum with ``max_steps`` points (the same number of gradient
    evaluations), one call. idgi: each term's −g ⊙ (b − a) becomes g²·(f_c(a) − f_c(b))/Σg²,
    i.e. IDGI on segments oriented adversarial → input, with f_c from ``predict`` (steepest), or
    IDGI on the straight line (straight).
    The gradient of ``output`` (default probability = AGI_main.py's softmax) is used for both
    classes. ``double_softmax=True`` (with output="probability", steepest path) is the preset of
    AGI_quantitive.py, whose Softmax-ended model gets a second softmax in pgd_step: gradients of
    softmax(softmax(z)), one gradient call per step all the same (class weights ∂q/∂z from the
    logits of the stop check, which then always comes from a predict).
    Returns float32 (N, *input_shape); with ``return_per_class`` also the per-class maps
    (N, k, *input_shape) (zeros in unused slots, see ``select_classes``).
    """
    check_output(output)
    if double_softmax and (output != "probability" or path != "steepest"):
        raise ValueError(
            "double_softmax (AGI_quantitive.py's preset) needs output='probability' and path='steepest', "
            f"got output={output!r}, path={path!r}"
        )
    objective = _Objective(output, double_softmax)
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if int(max_steps) < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    x = check_input(model, x)
    logits0 = np.asarray(model.predict(x), dtype=np.float64)
    explained = resolve_target(model, x, target, logits0)
    adv = select_classes(explained, logits0, classes, selection, seed)

    img, slot = np.nonzero(adv >= 0)  # one row per (image, adversarial class) pair
    # Pairs walk their paths independently: run them in groups whose gradient calls fit one
    # chunk of the model's batch size, so memory does not grow with images × classes. Each
    # group's maps are added to their image's total in slot order, as a sum over the slots would.
    group = max(1, chunk_rows(model) // (2 if path == "steepest" else 1))
    total = np.zeros(x.shape, dtype=np.float64)
    per_class = np.zeros((*adv.shape, *x.shape[1:]), dtype=np.float64) if return_per_class else None
    for start in range(0, len(img), group):
        rows = slice(start, start + group)
        acc = _walk(
            model, objective, x[img[rows]].astype(np.float64), adv[img[rows], slot[rows]],
            explained[img[rows]], logits0[img[rows]], float(eps), int(max_steps), accumulate, path, idgi,
        )  # fmt: skip
        if per_class is not None:
            per_class[img[rows], slot[rows]] = acc
        for r, i in enumerate(img[rows]):
            total[i] += acc[r]
    total = total.astype(np.float32)
    return (total, per_class.astype(np.float32)) if return_per_class else total


def _walk(model, objective, x0, cls, lab, logits0, eps, max_steps, accumulate, path, idgi):
    """AGI for a group of (image, adversarial class) pairs: x0 (M, *s) float64 the pairs' images,
    ``cls`` / ``lab`` (M,) their adversarial and explained classes, ``logits0`` (M, K) at x0.
    Returns the per-pair maps (M, *s) float64."""
    lo, hi = (float(v) for v in model.input_range)
    double_softmax, output = objective.double, objective.output
    xp = x0.copy()
    acc = np.zeros_like(x0)
    f_x0 = objective.scores(logits0, lab)
    running = np.arange(len(x0))
    pending = None  # IDGI: (rows, gradient, f_c at the segment start) awaiting f_c at its end
    steepest = path == "steepest"
    logits = logits0  # at xp[running]; None when not yet known
    fold = False
    for _ in range(max_steps):
        if logits is None and not fold:
            logits = np.asarray(model.predict(xp[running].astype(np.float32)), dtype=np.float64)
        grads = None
        if logits is None:  # fold: the gradient call also brings the logits of the same points
            grads, logits = _path_gradients(
                model, xp[running], cls[running], lab[running], objective, steepest
            )
        if pending is not None:
            rows, g, f_start = pending
            acc[rows] += idgi_step(g, f_start - objective.scores(logits, lab[rows]))
            pending = None
        keep = logits.argmax(axis=1) != cls[running]
        before = running.size
        running, logits = running[keep], logits[keep]
        if running.size == 0:
            break
        # Stopped pairs' rows in a folded call were wasted (2 gradient rows each), a separate
        # predict costs ~1/4 gradient row per running pair: fold while few pairs stop per step.
        fold = 8 * (before - running.size) <= before and not double_softmax
        if grads is None:
            grads, _ = _path_gradients(
                model, xp[running], cls[running], lab[running], objective, steepest, logits
            )
        else:
            grads = tuple(None if g is None else g[keep] for g in grads)
        g_adv, g_lab = grads
        start = xp[running] if accumulate else x0[running]
        new = np.clip(start + eps * np.sign(g_adv), lo, hi)
        if steepest and idgi:
            f_start = objective.scores(logits, lab[running]) if accumulate else f_x0[running]
            pending = (running, g_lab, f_start)
        elif steepest:
            acc[running] += -g_lab * (new - start)
        xp[running] = new
        logits = None
    if pending is not None:  # the last segment's end point was never predicted
        rows, g, f_start = pending
        logits = np.asarray(model.predict(xp[rows].astype(np.float32)), dtype=np.float64)
        acc[rows] += idgi_step(g, f_start - objective.scores(logits, lab[rows]))
    if not steepest:
        x_adv = xp.astype(np.float32)
        acc, _ = integrate_straight_path(
            model, x0.astype(np.float32), x_adv, lab, output, int(max_steps), "right", idgi
        )
    return acc
