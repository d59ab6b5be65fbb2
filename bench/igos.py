"""I-GOS on EfficientNet-Lite0 at 224x224: onnxplain vs a torch loop with the reference's structure.

The peer follows zhongangqi/IGOS ``Integrated_Mask`` (spec methods.md §9a): one image at a time,
every integration point its own forward pass, the integrated loss accumulated and differentiated
by autograd, then the line search one candidate at a time (noise-free end point, step 200, λ1
decay, /20). onnxplain runs ``igos(preset="reference")`` on all images at once: one batched
gradient call per iteration for every point of every image. Both sides run noise-free
(``noise_std=0``) so that their masks can be compared (with noise only the distributions agree:
torch's and numpy's generators differ); the baseline is the same 51×51, σ=50 blur, computed once
outside the timing for the peer.

    python -m bench.igos [--images 8] [--mask 28] [--iterations 15] [--points 20] [--threads 2]
                         [--peer-images K]   # time the peer on the first K photos only
    python -m bench.igos --quick     # 1 image, 8×8 mask, 3 iterations, 4 points
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

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

TARGET = 0.3


def peer_igos(net, img, blur, category, *, size, iterations, points, l1=1.0, tv=20.0, beta=2.0):
    """The demo's loop for ONE image (1, 3, H, W) tensors; returns the low-resolution mask."""
    mask = torch.ones(1, 1, size, size, requires_grad=True)
    upsample = torch.nn.UpsamplingBilinear2d(size=img.shape[2:])

    def reg(m, l1):
        dr = (m[..., 1:, :] - m[..., :-1, :]).abs().pow(beta).mean()
        dc = (m[..., :, 1:] - m[..., :, :-1]).abs().pow(beta).mean()
        return l1 * (1 - m).abs().mean() + tv * (dr + dc)

    def end_point(m):
        u = upsample(m).expand(1, 3, *img.shape[2:])
        return torch.softmax(net(img * u + blur * (1 - u)), dim=1)[0, category]

    curve = []
    for it in range(iterations):
        u = upsample(mask).expand(1, 3, *img.shape[2:])
        loss1 = reg(mask, l1)
        loss_all = loss1.clone()
        for k in range(points):
            a = (k + 1.0) / points * u
            loss_all = loss_all + torch.softmax(net(img * a + blur * (1 - a)), dim=1)[0, category] / 20.0
        mask.grad = None
        loss_all.backward()
        grad = mask.grad.detach().clone()
        with torch.no_grad():
            score = end_point(mask)
            curve += [score.item()] * (2 if it == 0 else 1)
            base = (loss1 + score).item()
            sq = (grad * grad).sum().item()
            step = 200.0
            while True:
                cand = (mask - step * grad).clamp(0, 1)
                if (reg(cand, l1) + end_point(cand)).item() <= base - 1e-4 * step * sq:
                    break
                step *= 0.2
                if step < 1e-5:
                    break
            mask.data = (mask.data - step * grad).clamp(0, 1)
        if iterations > 3:
            if it == int(iterations / 2) and abs(curve[0] - curve[it]) <= 0.001:
                l1 /= 10
            elif it == int(iterations / 1.25) and abs(curve[0] - curve[it]) <= 0.01:
                l1 /= 5
    return mask.detach()[0, 0].numpy()


def bench(
    clf, net, images: int, size: int, iterations: int, points: int, peer_images: int | None = None
) -> tuple[Row, list, list]:
    import engine
    from engine.perturb import gaussian_blur_reflect

    x = photo_batch(images)
    target = clf.predict(x).argmax(axis=1)
    params = {"preset": "reference", "mask_size": size, "iterations": iterations, "points": points}
    params["noise_std"] = 0.0
    engine.explain(
        clf, x[:1], "igos", target=target[:1], **{**params, "iterations": 1, "points": 2}
    )  # warm-up
    start = time.perf_counter()
    _, details = engine.explain(clf, x, "igos", target=target, return_details=True, **params)
    ours_s = (time.perf_counter() - start) / images

    blur = torch.from_numpy(gaussian_blur_reflect(x, 51, 50.0, (2, 3)))
    xt = torch.from_numpy(x)
    peer_masks, peer_times = [], []
    # the peer's cost per image does not depend on the batch (it runs one image at a time), so a
    # full-size run may time it on fewer photos than ours
    peer_n = images if peer_images is None else max(1, min(peer_images, images))
    for n in range(peer_n):
        start = time.perf_counter()
        peer_masks.append(
            peer_igos(
                net,
                xt[n : n + 1],
                blur[n : n + 1],
                int(target[n]),
                size=size,
                iterations=iterations,
                points=points,
            )
        )
        peer_times.append(time.perf_counter() - start)
    peer = np.stack(peer_masks)
    ours = details["mask"][:peer_n]
    per_image = [relative_difference(ours[n], peer[n]) for n in range(peer_n)]
    row = Row(
        name="igos (reference)",
        peer="torch loop, 1 image, autograd",
        ours_s=ours_s,
        peer_s=float(np.mean(peer_times)),
        target=TARGET,
        rel_diff=relative_difference(ours, peer),
        rel_l2=relative_l2(ours, peer),
        note=f"seconds per image; {images} images (peer {peer_n}), mask {size}x{size}, "
        f"{iterations} iterations, {points} points, noise off; peer per image: "
        + ", ".join(f"{t:.2f}" for t in peer_times),
    )
    return row, per_image, peer_times


def main(argv=None) -> Row:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--mask", type=int, default=28)
    parser.add_argument("--iterations", type=int, default=15)
    parser.add_argument("--points", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peer-images", type=int, default=None, help="photos the peer is timed on")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR)
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.mask, args.iterations, args.points = 1, 8, 3, 4
    import engine

    work = prepare_workdir(args.workdir)
    torch.set_num_threads(args.threads)
    clf = engine.load(efficientnet_onnx(work), providers=["CPUExecutionProvider"], threads=args.threads)
    clf.gradient(photo_batch(1), 0, output="probability")  # compile before timing
    net = torch_efficientnet()
    print(
        f"I-GOS, EfficientNet-Lite0 224x224, CPU, {args.threads} threads, output=probability, "
        f"51x51 sigma=50 blur baseline; one timed run per side"
    )
    row, per_image, _ = bench(
        clf, net, args.images, args.mask, args.iterations, args.points, args.peer_images
    )
    print_table([row])
    print(
        "max |ours - peer| / max |peer| per image (low-res masks): "
        + ", ".join(f"{d:.1e}" for d in per_image)
    )
    (work / "igos_bench.json").write_text(
        json.dumps(
            {"args": vars(args), "row": row.__dict__ | {"ratio": row.ratio}, "per_image": per_image}, indent=2
        )
    )
    return row


if __name__ == "__main__":
    main()
