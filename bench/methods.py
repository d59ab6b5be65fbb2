"""Path methods on EfficientNet-Lite0 at 224x224: onnxplain vs the peer implementations, one run.

    integrated_gradients  vs captum IntegratedGradients (gausslegendre, internal_batch_size=16)
    agi                   vs a torch loop shaped like the reference code (pd90506/AGI, spec §8):
                          pgd_step as written (trainable parameters, loss.backward per class), or
                          with --agi-peer input-only frozen parameters and autograd.grad
    guided_ig             vs PAIR saliency GuidedIG with a torch callback, one image at a time

Both sides see the same [0, 1] images, baseline, explained classes and thread count; each line
prints both median timings, the ratio ours / peer against its target, and max |ours − peer| /
max |peer| and ‖ours − peer‖ / ‖peer‖ to show the two compute the same map. AGI and Guided IG
amplify float32 gradient noise (sign(≈0), quantile ties), so for them the peer's algorithm is also
run, untimed, on onnxplain's gradients: that gap must be ~1e-7.

    python -m bench.methods [--only ig agi guided_ig] [--repeats 3] [--images N] [--steps N]
                            [--classes K] [--agi-images 1|2] [--agi-peer reference|input-only]
                            [--threads 2] [--workdir DIR]
    python -m bench.methods --quick      # smoke test: 1 image, a few steps, 1 repeat
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from dataclasses import asdict, dataclass

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

BENCHMARKS = ("ig", "agi", "guided_ig")
CAPTUM_BATCH = 16
AGI_EPS = 0.05
GIG_FRACTION = 0.25
GIG_MAX_DIST = 0.02
# Per benchmark: full-size defaults, the --quick sizes, and the ratio ours / peer to reach.
FULL = {
    "ig": {"images": 4, "steps": 64},
    "agi": {"images": 1, "steps": 20, "classes": 20},
    "guided_ig": {"images": 8, "steps": 200},
}
QUICK = {
    "ig": {"images": 1, "steps": 8},
    "agi": {"images": 1, "steps": 3, "classes": 3},
    "guided_ig": {"images": 1, "steps": 8},
}
TARGETS = {"ig": 0.3, "agi": 0.1, "guided_ig": 0.2}


@dataclass
class Setup:
    """What every benchmark shares: the onnxplain Classifier, the torch twin and the run size."""

    clf: object
    net: object
    repeats: int


def sizes(args: argparse.Namespace, name: str) -> dict:
    """The benchmark's images/steps/classes: explicit flags win over --quick, which wins over FULL."""
    size = dict((QUICK if args.quick else FULL)[name])
    for key in ("images", "steps", "classes"):
        value = getattr(args, key)
        if value is not None and key in size:
            size[key] = value
    if name == "agi" and args.agi_images is not None:
        size["images"] = args.agi_images
    return size


def shared_batch(setup: Setup, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` photos and their top-1 classes (from the ONNX model; the torch twin must agree, else
    the two sides would explain different classes)."""
    x = photo_batch(n)
    target = setup.clf.predict(x).argmax(axis=1)
    with torch.no_grad():
        torch_target = setup.net(torch.from_numpy(x)).argmax(dim=1).numpy()
    if not np.array_equal(target, torch_target):
        raise RuntimeError(f"top-1 classes differ: onnx {target.tolist()}, torch {torch_target.tolist()}")
    return x, target


def agreement(ours: np.ndarray, peer: np.ndarray) -> tuple[float, float]:
    return relative_difference(ours, peer), relative_l2(ours, peer)


# ---------------------------------------------------------------- integrated gradients vs captum


def captum_ig(net, x: np.ndarray, target: np.ndarray, steps: int) -> np.ndarray:
    from captum.attr import IntegratedGradients

    ig = IntegratedGradients(lambda inp: torch.softmax(net(inp), dim=1))
    xt = torch.from_numpy(x)
    attr = ig.attribute(
        xt,
        baselines=torch.zeros_like(xt),
        target=target.tolist(),
        n_steps=steps,
        method="gausslegendre",
        internal_batch_size=CAPTUM_BATCH,
    )
    return attr.detach().numpy()


def bench_ig(setup: Setup, images: int, steps: int) -> Row:
    import engine

    x, target = shared_batch(setup, images)

    def ours(n_steps=steps):
        return engine.explain(
            setup.clf,
            x,
            "integrated_gradients",
            target=target,
            output="probability",
            baseline="black",
            steps=n_steps,
            quadrature="gausslegendre",
        )

    ours_s, ours_map = median_seconds(ours, setup.repeats, warmup=lambda: ours(2))
    peer_s, peer_map = median_seconds(
        lambda: captum_ig(setup.net, x, target, steps),
        setup.repeats,
        warmup=lambda: captum_ig(setup.net, x, target, 2),
    )
    return Row(
        "integrated_gradients",
        f"captum IG (batch {CAPTUM_BATCH})",
        ours_s,
        peer_s,
        TARGETS["ig"],
        *agreement(ours_map, peer_map),
    )


# ---------------------------------------------------------------- AGI vs the reference loop


def spaced_classes(num_classes: int, k: int) -> list[int]:
    """AGI_main.py's deterministic choice ``range(0, K - 1, K // k)``, shared by both sides."""
    return list(range(0, num_classes - 1, num_classes // k))


class TorchAGIModel:
    """The reference ``pgd_step``'s model calls: one forward, then one backward per class through
    the same graph (``retain_graph`` for the first)."""

    def __init__(self, net):
        self.net = net

    def forward(self, xp):
        xp = xp.detach().requires_grad_(True)
        logits = self.net(xp)
        return int(logits.argmax(dim=1)), (xp, logits)

    def gradients(self, state, adv: int, label: int):
        xp, logits = state
        prob = torch.softmax(logits, dim=1)
        (g_adv,) = torch.autograd.grad(prob[0, adv], xp, retain_graph=True)
        (g_lab,) = torch.autograd.grad(prob[0, label], xp)
        return g_adv, g_lab


class TorchAGIReference(TorchAGIModel):
    """``pgd_step``'s calls exactly as the reference writes them: parameters left trainable,
    ``model.zero_grad(); loss.backward(retain_graph=True)`` for the adversarial class, then
    ``model.zero_grad(); x.grad.zero_(); loss_lab.backward()`` — each backward also computes the
    weight gradients, as in the reference. The forward is ``TorchAGIModel``'s."""

    def gradients(self, state, adv: int, label: int):
        xp, logits = state
        prob = torch.softmax(logits, dim=1)
        self.net.zero_grad()
        prob[0, adv].backward(retain_graph=True)
        g_adv = xp.grad.detach().clone()
        self.net.zero_grad()
        xp.grad.zero_()
        prob[0, label].backward()
        return g_adv, xp.grad.detach().clone()


class OnnxAGIModel:
    """The same calls on onnxplain's Classifier, for a float64 loop: the reference loop fed our
    gradients, with onnxplain's float64 iterate arithmetic, isolates the algorithm from float32
    noise. (A 1-ulp difference in an iterate moves the gradient by ~1e-5, enough to flip
    sign(g_adv) where g_adv ≈ 0, and each flip moves that pixel by 2·eps at the next step.)"""

    def __init__(self, clf):
        self.clf = clf

    def forward(self, xp):
        arr = xp.numpy().astype(np.float32)
        return int(self.clf.predict(arr).argmax(axis=1)[0]), arr

    def gradients(self, arr, adv: int, label: int):
        _, g = self.clf.gradient(np.concatenate([arr, arr]), [adv, label], output="probability")
        g = torch.from_numpy(g.astype(np.float64))
        return g[:1], g[1:]


def agi_one_class(model, x0, label: int, adv: int, steps: int):
    """The reference ``pgd_step`` with ``fgsm_step`` (accumulate=False) for one (image, class):
    forward, early stop when the prediction is ``adv``, the two gradients, an FGSM step from x0."""
    xp, acc = x0.clone(), torch.zeros_like(x0)
    for _ in range(steps):
        pred, state = model.forward(xp)
        if pred == adv:
            break
        g_adv, g_lab = model.gradients(state, adv, label)
        new = torch.clamp(x0 + AGI_EPS * g_adv.sign(), 0.0, 1.0)  # from x0: the reference's fgsm_step
        acc -= g_lab * (new - x0)
        xp = new
    return acc


def reference_agi(model, x: np.ndarray, target: np.ndarray, classes: list[int], steps: int) -> np.ndarray:
    """Σ over the adversarial classes of ``agi_one_class``, skipping the explained class as the
    reference does; images and classes one at a time, as the reference."""
    xt = torch.from_numpy(x)
    total = torch.zeros_like(xt)
    for i, label in enumerate(target.tolist()):
        for adv in classes:
            if adv != label:
                total[i] += agi_one_class(model, xt[i : i + 1], label, adv, steps)[0]
    return total.numpy()


def same_gradient_note(ours: np.ndarray, same: np.ndarray, what: str) -> str:
    """The agreement with the peer's algorithm fed onnxplain's gradients, and what it means."""
    diff, l2 = agreement(ours, same)
    verdict = (
        "same algorithm: the gap to the torch-fed peer is float32 gradient noise"
        if diff < 1e-4
        else "ALGORITHMS DIFFER"
    )
    return (
        f"{what} vs the peer fed onnxplain's gradients: max|d|/max|ref| {diff:.2e}, "
        f"|d|/|ref| {l2:.2e} ({verdict})"
    )


def bench_agi(setup: Setup, images: int, steps: int, classes: int, agi_peer: str = "reference") -> Row:
    import engine

    x, target = shared_batch(setup, images)
    ids = spaced_classes(setup.clf.num_classes, classes)
    if agi_peer == "reference":
        peer, what = TorchAGIReference(torch_efficientnet(frozen=False)), "torch loop (reference code)"
    else:
        peer, what = TorchAGIModel(setup.net), "torch loop, input gradients only"

    def ours(n_steps=steps, class_ids=ids, rows=slice(None)):
        return engine.explain(
            setup.clf,
            x[rows],
            "agi",
            target=target[rows],
            output="probability",
            classes=class_ids,
            eps=AGI_EPS,
            max_steps=n_steps,
            accumulate=False,
            path="steepest",
        )

    ours_s, ours_map = median_seconds(ours, setup.repeats, warmup=lambda: ours(2, ids[:2]))
    peer_s, peer_map = median_seconds(
        lambda: reference_agi(peer, x, target, ids, steps),
        setup.repeats,
        warmup=lambda: reference_agi(peer, x, target, ids[:1], 2),
    )
    # untimed: image 0 and two classes keep the single-row onnx loop short
    few = [c for c in ids if c != target[0]][:2]
    same = reference_agi(OnnxAGIModel(setup.clf), x[:1].astype(np.float64), target[:1], few, steps)
    note = same_gradient_note(ours(class_ids=few, rows=slice(0, 1)), same, f"image 0, classes {few}")
    return Row(
        "agi",
        what,
        ours_s,
        peer_s,
        TARGETS["agi"],
        *agreement(ours_map, peer_map),
        note=note,
    )


# ---------------------------------------------------------------- Guided IG vs PAIR saliency


class _QuantileShim:
    """numpy, with the pre-2.0 ``quantile(..., interpolation=)`` keyword that PAIR 0.2.1 passes."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def quantile(a, q, *args, interpolation=None, **kwargs):
        if interpolation is not None:
            kwargs["method"] = interpolation
        return np.quantile(a, q, *args, **kwargs)


@contextlib.contextmanager
def pair_numpy2_shim():
    """Swap the ``np`` that saliency.core.guided_ig sees for ``_QuantileShim`` while it runs."""
    from saliency.core import guided_ig as pair_module

    original = pair_module.np
    pair_module.np = _QuantileShim()
    try:
        yield
    finally:
        pair_module.np = original


def torch_call_model_function(net):
    """PAIR's callback: HWC batch in, d softmax[class] / d input out, HWC (PAIR's layout)."""
    from saliency.core import INPUT_OUTPUT_GRADIENTS

    def call_model_function(batch_hwc, call_model_args=None, expected_keys=None):
        nchw = np.ascontiguousarray(np.transpose(batch_hwc, (0, 3, 1, 2)), dtype=np.float32)
        xt = torch.from_numpy(nchw).requires_grad_(True)
        prob = torch.softmax(net(xt), dim=1)
        (grad,) = torch.autograd.grad(prob[:, call_model_args["class"]].sum(), xt)
        return {INPUT_OUTPUT_GRADIENTS: grad.numpy().transpose(0, 2, 3, 1)}

    return call_model_function


def onnx_call_model_function(clf):
    """The same callback on onnxplain's gradient model: PAIR fed our gradients isolates the
    algorithm from float32 gradient noise, which the quantile selection amplifies."""
    from saliency.core import INPUT_OUTPUT_GRADIENTS

    def call_model_function(batch_hwc, call_model_args=None, expected_keys=None):
        nchw = np.ascontiguousarray(np.transpose(batch_hwc, (0, 3, 1, 2)), dtype=np.float32)
        _, grad = clf.gradient(nchw, call_model_args["class"], output="probability")
        return {INPUT_OUTPUT_GRADIENTS: grad.transpose(0, 2, 3, 1)}

    return call_model_function


def pair_guided_ig(callback, x: np.ndarray, target: np.ndarray, steps: int) -> np.ndarray:
    from saliency.core import GuidedIG

    method, maps = GuidedIG(), []
    with pair_numpy2_shim():
        for image, label in zip(x.transpose(0, 2, 3, 1), target.tolist(), strict=True):
            maps.append(
                method.GetMask(
                    image,
                    callback,
                    call_model_args={"class": label},
                    x_baseline=np.zeros_like(image),
                    x_steps=steps,
                    fraction=GIG_FRACTION,
                    max_dist=GIG_MAX_DIST,
                )
            )
    return np.stack(maps).transpose(0, 3, 1, 2)


def bench_guided_ig(setup: Setup, images: int, steps: int) -> Row:
    import engine

    x, target = shared_batch(setup, images)
    peer = torch_call_model_function(setup.net)

    def ours(n_steps=steps):
        return engine.explain(
            setup.clf,
            x,
            "guided_ig",
            target=target,
            output="probability",
            baseline="black",
            steps=n_steps,
            fraction=GIG_FRACTION,
            max_dist=GIG_MAX_DIST,
        )

    ours_s, ours_map = median_seconds(ours, setup.repeats, warmup=lambda: ours(2))
    peer_s, peer_map = median_seconds(
        lambda: pair_guided_ig(peer, x, target, steps),
        setup.repeats,
        warmup=lambda: pair_guided_ig(peer, x[:1], target[:1], 2),
    )
    same = pair_guided_ig(onnx_call_model_function(setup.clf), x[:1], target[:1], steps)  # untimed
    note = same_gradient_note(ours_map[:1], same, "image 0")
    return Row(
        "guided_ig",
        "PAIR GuidedIG (1 image/call)",
        ours_s,
        peer_s,
        TARGETS["guided_ig"],
        *agreement(ours_map, peer_map),
        note=note,
    )


# ---------------------------------------------------------------- driver


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per side (default 3)")
    parser.add_argument("--images", type=int, default=None, help="images for every benchmark")
    parser.add_argument("--steps", type=int, default=None, help="steps (AGI: max_steps) for every benchmark")
    parser.add_argument("--classes", type=int, default=None, help="AGI adversarial classes k")
    parser.add_argument("--agi-images", type=int, choices=(1, 2), default=None)
    parser.add_argument(
        "--agi-peer",
        choices=("reference", "input-only"),
        default="reference",
        help="reference: pgd_step as written (trainable parameters, loss.backward); input-only: "
        "frozen parameters and autograd.grad, the fastest torch loop of the same structure",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, 1 repeat")
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR)
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    return args


def make_setup(args: argparse.Namespace, work) -> Setup:
    """Load both models with ``args.threads`` threads and compile the gradient model up front, so
    no timing (warm-up aside) includes the compiler."""
    import engine

    torch.set_num_threads(args.threads)
    clf = engine.load(efficientnet_onnx(work), providers=["CPUExecutionProvider"], threads=args.threads)
    clf.gradient(photo_batch(1), 0, output="probability")
    return Setup(clf=clf, net=torch_efficientnet(), repeats=args.repeats)


def run(args: argparse.Namespace, setup: Setup) -> list[Row]:
    runners = {"ig": bench_ig, "agi": bench_agi, "guided_ig": bench_guided_ig}
    rows = []
    for name in args.only:
        size = sizes(args, name)
        print(f"{name}: {size} ...", flush=True)
        start = time.perf_counter()
        extra = {"agi_peer": args.agi_peer} if name == "agi" else {}
        rows.append(runners[name](setup, **size, **extra))
        print(f"  done in {time.perf_counter() - start:.1f} s", flush=True)
    return rows


def main(argv=None) -> list[Row]:
    args = parse_args(argv)
    work = prepare_workdir(args.workdir)
    setup = make_setup(args, work)
    print(
        f"EfficientNet-Lite0 224x224, CPU, {args.threads} threads, median of {args.repeats}, "
        f"output=probability, black baseline; AGI eps={AGI_EPS}, accumulate=False, spaced classes; "
        f"Guided IG fraction={GIG_FRACTION}, max_dist={GIG_MAX_DIST}"
    )
    rows = run(args, setup)
    print_table(rows)
    record = {
        "args": vars(args),
        "sizes": {n: sizes(args, n) for n in args.only},
        "rows": [asdict(r) | {"ratio": r.ratio, "met": r.met} for r in rows],
    }
    (work / "methods_bench.json").write_text(json.dumps(record, indent=2))
    return rows


if __name__ == "__main__":
    main()
