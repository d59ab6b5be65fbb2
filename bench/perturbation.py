"""Forward-only perturbation methods on EfficientNet-Lite0 at 224x224: onnxplain vs peers, one run.

    rise       vs a torch RISE shaped like the reference (eclique/RISE ``explanations.py::RISE``):
               per image, masks ⊙ image for all N masks, the model (softmax) in batches of 100,
               then p^T @ masks / (N · p1) for all classes. The peer's masks are the very masks
               onnxplain draws (``rise_masks``, same seed) and are made before its clock starts
               (the reference loads them from masks.npy); onnxplain's time includes drawing
               them. Timed twice on our side: the target class only, and all classes as the peer.
    occlusion  vs captum ``Occlusion`` (sliding window (3, w, w), strides (3, s, s), baseline 0,
               ``perturbations_per_eval`` windows per forward call).

Both sides see the same [0, 1] images and explained classes (top-1) and the same thread count;
each line prints both timings, the ratio ours / peer against its target (RISE 0.5, occlusion 0.5),
and max |ours − peer| / max |peer| and ‖ours − peer‖ / ‖peer‖.

    python -m bench.perturbation [--only rise occlusion] [--images 8] [--masks 4000] [--cells 8]
                                 [--keep 0.1] [--window 15] [--stride 8] [--captum-batch 16]
                                 [--repeats 1] [--threads 2] [--workdir DIR]
    python -m bench.perturbation --quick      # smoke test: 2 images, 200 masks, window 15 stride 32
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict

import numpy as np
import torch

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

BENCHMARKS = ("rise", "occlusion")
TARGETS = {"rise": 0.5, "occlusion": 0.5}
RISE_PEER_BATCH = 100  # the reference's gpu_batch


def torch_rise(
    net, x: np.ndarray, masks: torch.Tensor, p1: float, batch: int = RISE_PEER_BATCH
) -> np.ndarray:
    """RISE.forward for one image (3, H, W): (K, H, W) maps of every class."""
    n = len(masks)
    with torch.no_grad():
        stack = torch.mul(masks, torch.from_numpy(x)[None])
        p = torch.cat([torch.softmax(net(stack[i : min(i + batch, n)]), dim=1) for i in range(0, n, batch)])
        sal = torch.matmul(p.transpose(0, 1), masks.view(n, -1))
    return (sal.view(p.shape[1], *x.shape[1:]) / n / p1).numpy()


def bench_rise(clf, net, x, target, args) -> list[Row]:
    import engine
    from engine.methods.rise import rise_masks

    kw = dict(n_masks=args.masks, cells=args.cells, keep_probability=args.keep, seed=0)
    masks = torch.from_numpy(rise_masks(args.masks, args.cells, args.keep, x.shape[2:], seed=0))[:, None]

    def ours(all_classes=False):
        return engine.explain(
            clf, x, "rise", target=target, output="probability", all_classes=all_classes, **kw
        )

    def peer():
        return np.stack([torch_rise(net, x[i], masks, args.keep) for i in range(len(x))])

    small = dict(kw, n_masks=RISE_PEER_BATCH)
    ours_s, ours_map = median_seconds(
        ours, args.repeats, warmup=lambda: engine.explain(clf, x[:1], "rise", target=target[:1], **small)
    )
    all_s, all_map = median_seconds(lambda: ours(True), args.repeats, warmup=lambda: None)
    peer_s, peer_map = median_seconds(
        peer, args.repeats, warmup=lambda: torch_rise(net, x[0], masks[:100], args.keep)
    )
    peer_target = peer_map[np.arange(len(x)), target]
    name = f"rise N={args.masks} s={args.cells}"
    return [
        Row(
            name,
            f"torch RISE (batch {RISE_PEER_BATCH})",
            ours_s,
            peer_s,
            TARGETS["rise"],
            relative_difference(ours_map[:, 0], peer_target),
            relative_l2(ours_map[:, 0], peer_target),
            "ours: target class only; the peer computes every class",
        ),  # fmt: skip
        Row(
            name + " all",
            f"torch RISE (batch {RISE_PEER_BATCH})",
            all_s,
            peer_s,
            TARGETS["rise"],
            relative_difference(all_map, peer_map),
            relative_l2(all_map, peer_map),
            "ours: all_classes=True, as the peer",
        ),  # fmt: skip
    ]


def captum_occlusion(net, x, target, window, stride, per_eval) -> np.ndarray:
    from captum.attr import Occlusion

    occ = Occlusion(lambda inp: torch.softmax(net(inp), dim=1))
    with torch.no_grad():
        attr = occ.attribute(
            torch.from_numpy(x),
            sliding_window_shapes=(3, window, window),
            strides=(3, stride, stride),
            baselines=0.0,
            target=torch.from_numpy(target),
            perturbations_per_eval=per_eval,
        )
    return attr.numpy()


def bench_occlusion(clf, net, x, target, args) -> list[Row]:
    import engine

    def ours():
        return engine.explain(
            clf, x, "occlusion", target=target, output="probability", window=args.window, stride=args.stride
        )

    ours_s, ours_map = median_seconds(ours, args.repeats, warmup=lambda: clf.predict(x[:2]))
    peer_s, peer_map = median_seconds(
        lambda: captum_occlusion(net, x, target, args.window, args.stride, args.captum_batch),
        args.repeats,
        warmup=lambda: net(torch.from_numpy(x[:2])),
    )
    return [
        Row(
            f"occlusion w={args.window} s={args.stride}",
            f"captum Occlusion (ppe {args.captum_batch})",
            ours_s,
            peer_s,
            TARGETS["occlusion"],
            relative_difference(ours_map, peer_map),
            relative_l2(ours_map, peer_map),
        ),  # fmt: skip
    ]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    parser.add_argument("--images", type=int, default=None, help="photos (default 8)")
    parser.add_argument("--masks", type=int, default=None, help="RISE masks N (default 4000)")
    parser.add_argument("--cells", type=int, default=8, help="RISE cells s")
    parser.add_argument("--keep", type=float, default=0.1, help="RISE keep probability p1")
    parser.add_argument("--window", type=int, default=15)
    parser.add_argument("--stride", type=int, default=None, help="occlusion stride (default 8)")
    parser.add_argument("--captum-batch", type=int, default=16, help="captum perturbations_per_eval")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per side")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny sizes")
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR)
    args = parser.parse_args(argv)
    quick = {"images": 2, "masks": 200, "stride": 15}
    full = {"images": 8, "masks": 4000, "stride": 8}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> list[Row]:
    import engine

    args = parse_args(argv)
    work = prepare_workdir(args.workdir)
    torch.set_num_threads(args.threads)
    clf = engine.load(efficientnet_onnx(work), providers=["CPUExecutionProvider"], threads=args.threads)
    net = torch_efficientnet()
    x = photo_batch(args.images)
    target = clf.predict(x).argmax(1)
    print(
        f"EfficientNet-Lite0 224x224, CPU, {args.threads} threads, {args.images} photos, median of "
        f"{args.repeats}, output=probability, top-1 class; batch_size={clf.batch_size}",
        flush=True,
    )
    rows: list[Row] = []
    for name in args.only:
        start = time.perf_counter()
        print(f"{name} ...", flush=True)
        rows += (bench_rise if name == "rise" else bench_occlusion)(clf, net, x, target, args)
        print(f"  done in {time.perf_counter() - start:.1f} s", flush=True)
    print_table(rows)
    record = {"args": vars(args), "rows": [asdict(r) | {"ratio": r.ratio, "met": r.met} for r in rows]}
    (work / "perturbation_bench.json").write_text(json.dumps(record, indent=2))
    return rows


if __name__ == "__main__":
    main()
