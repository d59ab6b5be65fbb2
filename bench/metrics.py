"""Evaluation metrics on EfficientNet-Lite0 at 224×224: onnxplain vs the reference structures, one run.

    insertion + deletion  vs RISE's CausalMetric.evaluate structure in torch (specs/metrics.md §2b):
                          every step predicts the whole image batch in batches of 100, then
                          writes the next pixels into the images; blur and normalised-zero
                          substrates, 224 pixels per step by default (225 points per curve)
    sic                   vs PAIR saliency's compute_pic_metric, one map at a time, with an
                          onnxruntime pred_func on the same ONNX file

Both sides see the same photos, maps, classes and thread count. Each line prints both timings,
the ratio ours / peer against its target (0.5) and max |ours − peer| / max |peer| on the curves.
PAIR's interpolation runs with scipy's LAPACK on one thread, as ours does (engine.metrics.pic
.single_threaded_lapack: same results, far less CPU on OpenBLAS's pool); ``--pair-threads
default`` times it as installed.

    python -m bench.metrics [--maps 8] [--step 224] [--sic-maps 8] [--threads 2] [--only causal sic]
    python -m bench.metrics --quick      # 2 maps, 1792 pixels per step, 1 SIC map
"""

from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np
import torch
from scipy import ndimage

from bench.common import (
    DEFAULT_WORKDIR,
    Row,
    efficientnet_onnx,
    photo_batch,
    prepare_workdir,
    print_table,
    relative_difference,
    relative_l2,
    torch_efficientnet,
)

TARGET = 0.5
RISE_BATCH = 100


def smooth_maps(n: int, seed: int = 0) -> np.ndarray:
    """``n`` reproducible 224×224 maps: smoothed noise (the timing does not depend on content;
    continuous values keep the ranking free of ties, which RISE's unstable argsort breaks
    arbitrarily)."""
    rng = np.random.default_rng(seed)
    return np.stack([ndimage.gaussian_filter(rng.normal(size=(224, 224)), 6) for _ in range(n)])


# ---------------------------------------------------------------- RISE CausalMetric.evaluate in torch


def rise_kernel() -> torch.Tensor:
    delta = np.zeros((11, 11))
    delta[5, 5] = 1
    k = ndimage.gaussian_filter(delta, 5)
    kern = np.zeros((3, 3, 11, 11))
    for i in range(3):
        kern[i, i] = k
    return torch.from_numpy(kern.astype("float32"))


def rise_evaluate(net, x: np.ndarray, maps: np.ndarray, mode: str, step: int, mean: float, std: float):
    """specs/metrics.md §2b on [0, 1] images for a net that normalises inside: the substrates are
    built in the normalised space (zeros; conv2d blur with zero padding) and mapped back."""
    n, hw = len(x), 224 * 224
    img = torch.from_numpy(x)
    z = (img - mean) / std
    blurred = torch.nn.functional.conv2d(z, rise_kernel(), padding=5) * std + mean
    zeros = torch.full_like(img, mean)
    if mode == "deletion":
        start, finish = img.clone(), zeros
    else:
        start, finish = blurred, img.clone()
    n_steps = (hw + step - 1) // step
    order = np.flip(np.argsort(maps.reshape(-1, hw), axis=1), axis=-1)
    with torch.no_grad():
        top = net(img).argmax(dim=1)
        scores = np.empty((n_steps + 1, n))
        for i in range(n_steps + 1):
            for j in range(-(-n // RISE_BATCH)):
                rows = slice(j * RISE_BATCH, (j + 1) * RISE_BATCH)
                prob = torch.softmax(net(start[rows]), dim=1)
                scores[i, rows] = prob[torch.arange(len(prob)), top[rows]].numpy()
            if i < n_steps:
                coords = torch.from_numpy(np.ascontiguousarray(order[:, step * i : step * (i + 1)]))
                flat_s, flat_f = start.view(n, 3, hw), finish.reshape(n, 3, hw)
                for r in range(n):
                    flat_s[r, :, coords[r]] = flat_f[r, :, coords[r]]
    return scores.T  # (N, points)


def bench_causal(clf, net, maps: int, step: int, mean: float, std: float) -> Row:
    from engine.metrics.causal import causal_curves

    x = photo_batch(maps)
    m = smooth_maps(maps)
    start = time.perf_counter()
    ours = causal_curves(clf, x, m, modes=("deletion", "insertion"), preset="rise", step=step)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    peer = [rise_evaluate(net, x, m, mode, step, mean, std) for mode in ("deletion", "insertion")]
    peer_s = time.perf_counter() - start
    ours_y = np.stack([r.curve_y for r in ours]).reshape(2, maps, -1)
    peer_y = np.stack(peer)
    points = ours_y.shape[-1]
    note = (
        f"{maps} maps × 2 curves × {points} points = {2 * maps * points} images; "
        f"insertion AUC ours {np.mean([r.score for r in ours[maps:]]):.4f}, "
        f"deletion AUC ours {np.mean([r.score for r in ours[:maps]]):.4f}"
    )
    return Row(
        "insertion+deletion",
        f"RISE evaluate, torch (batch {RISE_BATCH})",
        ours_s,
        peer_s,
        TARGET,
        relative_difference(ours_y, peer_y),
        relative_l2(ours_y, peer_y),
        note=note,
    )


# ---------------------------------------------------------------- SIC vs PAIR


def bench_sic(clf, model_path, maps: int, threads: int, pair_threads: str) -> Row:
    import onnxruntime as ort
    from saliency.metrics import pic

    from engine.metrics import evaluate
    from engine.metrics.pic import THRESHOLDS, random_masks, single_threaded_lapack

    x = photo_batch(maps)
    m = smooth_maps(maps, seed=1)
    u8 = np.clip(np.round(x.transpose(0, 2, 3, 1).astype(np.float64) * 255), 0, 255).astype(np.uint8)
    rmask = random_masks(maps, 224, 224, 0.01, seed=0)
    target = clf.predict(u8.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)).argmax(1)

    start = time.perf_counter()
    ours = evaluate(clf, x, m, "sic", target=target, random_mask=rmask, reduce="sum", min_pred_value=0.0)
    ours_s = time.perf_counter() - start

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def pred_func(cls):
        def pred(batch):
            logits = sess.run(None, {name: batch.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)})[
                0
            ]
            e = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
            return list(e[:, cls] / e.sum(axis=1))

        return pred

    if not hasattr(np, "trapz"):
        np.trapz = np.trapezoid  # PAIR 0.2.1 calls np.trapz (removed in numpy 2.4)
    context = single_threaded_lapack() if pair_threads == "single" else contextlib.nullcontext()
    peer, skipped = [], 0
    start = time.perf_counter()
    with context:
        for i in range(maps):
            try:
                peer.append(
                    pic.compute_pic_metric(u8[i], m[i], rmask[i], pred_func(int(target[i])), THRESHOLDS, 0.0)
                )
            except pic.ComputePicMetricError:
                peer.append(None)
                skipped += 1
    peer_s = time.perf_counter() - start
    pairs = [(o.curve_y, p.curve_y) for o, p in zip(ours, peer, strict=True) if p is not None]
    if pairs:
        ours_y, peer_y = (np.stack(v) for v in zip(*pairs, strict=True))
        diff, l2 = relative_difference(ours_y, peer_y), relative_l2(ours_y, peer_y)
    else:
        diff = l2 = float("nan")
    ours_skipped = sum(r.extra["skipped"] is not None for r in ours)
    note = (
        f"{maps} maps × {len(THRESHOLDS)} thresholds; skipped ours {ours_skipped}, PAIR {skipped}; "
        f"PAIR LAPACK threads: {pair_threads}"
    )
    return Row("sic", "PAIR compute_pic_metric + ort", ours_s, peer_s, TARGET, diff, l2, note=note)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=("causal", "sic"), default=("causal", "sic"))
    parser.add_argument("--maps", type=int, default=None, help="insertion/deletion maps (8)")
    parser.add_argument("--step", type=int, default=None, help="pixels per step (224)")
    parser.add_argument("--sic-maps", type=int, default=None, help="SIC maps (8)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pair-threads", choices=("single", "default"), default="single")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR)
    args = parser.parse_args(argv)
    maps = args.maps or (2 if args.quick else 8)
    step = args.step or (1792 if args.quick else 224)
    sic_maps = args.sic_maps or (1 if args.quick else 8)

    import engine
    from models.efficientnet import MEAN, STD

    torch.set_num_threads(args.threads)
    work = prepare_workdir(args.workdir)
    path = efficientnet_onnx(work)
    clf = engine.load(path, threads=args.threads, providers=["CPUExecutionProvider"])
    net = torch_efficientnet(frozen=True)
    clf.predict(photo_batch(1))  # session creation, untimed
    rows = []
    if "causal" in args.only:
        rows.append(bench_causal(clf, net, maps, step, MEAN[0], STD[0]))
    if "sic" in args.only:
        rows.append(bench_sic(clf, path, sic_maps, args.threads, args.pair_threads))
    print(f"threads {args.threads}; EfficientNet-Lite0 224×224, CPU")
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
