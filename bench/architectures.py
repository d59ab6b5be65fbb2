"""The real-architecture sweep (issue #9 §1): every torchvision classification model, every Keras
application and a broad sample of timm, with seeded random weights, through our exporters and the
compiler; input gradients against the framework's autograd and a float64 torch reference.

    python -m bench.architectures [--source torchvision,keras,timm] [--names a,b] [--timeout 900]
                                  [--tier all|small|large] [--jobs 1] [--resume] [--render]
                                  [--json docs/architectures.json] [--markdown docs/architectures.md]

Each architecture runs in its own subprocess (``--worker``) with a timeout, so a crash, a hang
or an out-of-memory kill costs one row, not the sweep. Every runtime is single-threaded (the
machine is shared; ``make sweep`` also runs it under ``nice``). The JSON record and the markdown
table are rewritten atomically after every architecture, so an interrupted sweep keeps what it
measured; ``--resume`` skips architectures the JSON already holds.

Per architecture: export (exporters.torch / exporters.keras, whose parity check compares
onnxruntime's logits with the framework's), compile (engine.compile.compile_model with its
self-check), input gradients of the logit of a seeded target for a batch of 2, and
max |ours - reference| / max |reference| against

* the framework in float32 (torch autograd; tf.GradientTape for Keras), and
* for torch models, torch autograd in float64 on a float64 copy of the module. oneDNN's float32
  convolutions on CPU are themselves off from the exact gradient by up to ~1e-3 of scale on deep
  networks (issue #9: resnet50 3e-3 from float64), so a model whose framework float32 gradient is
  off is judged against float64 and the table says so.

An architecture *matches* when its error against the framework is <= 1e-4 of scale, or, where
the framework's own float32 gradient is more than 1e-4 from float64, when ours is <= 1e-4 from
float64.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import types
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

# torchvision 0.28.0's wheel on the package index is a CUDA build: importing it registers fake
# (meta) kernels for its C++ operators (torchvision::nms, roi_align, ...) in
# torchvision._meta_registrations, and with torch 2.13's CPU wheel its C extension does not load,
# so those operators do not exist and `import torchvision` raises "operator torchvision::nms does
# not exist". The classification models never use those operators, so the sweep stubs that one
# module before anything imports torchvision (timm imports it too). This must run before any
# import of torchvision or timm in the process.
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))

import numpy as np  # noqa: E402

TOL = 1e-4  # relative to the gradient's scale, as in tests/test_zoo_gradients.py
BATCH = 2
SEED = 0
MAX_WEIGHT_BYTES = 2 * 1024**3  # one ONNX protobuf holds at most 2 GiB; the exporters write one
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
REPO = Path(__file__).resolve().parent.parent
DEFAULT_JSON = REPO / "docs" / "architectures.json"
DEFAULT_MARKDOWN = REPO / "docs" / "architectures.md"
SINGLE_THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "TF_NUM_INTRAOP_THREADS": "1",
    "TF_NUM_INTEROP_THREADS": "1",
    "ONNXPLAIN_THREADS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "KERAS_BACKEND": "tensorflow",
    "PYTHONWARNINGS": "ignore",
}


@dataclass(frozen=True)
class Arch:
    """One architecture of the sweep: ``size`` is the square input side in pixels; ``kwargs`` go
    to the model's constructor; ``large`` ones run after all others."""

    source: str  # torchvision | keras | timm
    name: str
    size: int = 64
    kwargs: dict = field(default_factory=dict)
    large: bool = False

    @property
    def key(self) -> str:
        return f"{self.source}:{self.name}"


# ----------------------------------------------------------------------------- the catalogue
# Small inputs (64 px) where the architecture takes any size, to save time; the sizes below are
# the architectures' minimum or fixed input sizes.
TORCHVISION_SIZE = {
    # AdaptiveAvgPool to 6x6 / 7x7 exports only when it divides the feature map: 224 px
    "alexnet": 224,
    "vgg11": 224,
    "vgg11_bn": 224,
    "vgg13": 224,
    "vgg13_bn": 224,
    "vgg16": 224,
    "vgg16_bn": 224,
    "vgg19": 224,
    "vgg19_bn": 224,
    "inception_v3": 96,  # >= 75 px
    "maxvit_t": 224,  # partition size 7 at stride 32
    "swin_t": 224,
    "swin_s": 224,
    "swin_b": 224,
    "swin_v2_t": 256,
    "swin_v2_s": 256,
    "swin_v2_b": 256,
    "vit_h_14": 56,
}
# ViTs take image_size: 64 px is a 4x4 grid of 16 px patches
TORCHVISION_KWARGS = {
    "vit_b_16": {"image_size": 64},
    "vit_b_32": {"image_size": 64},
    "vit_l_16": {"image_size": 64},
    "vit_l_32": {"image_size": 64},
    "vit_h_14": {"image_size": 56},
}
TORCHVISION_LARGE = {
    "regnet_y_128gf",
    "regnet_y_32gf",
    "regnet_x_32gf",
    "regnet_y_16gf",
    "regnet_x_16gf",
    "vit_h_14",
    "vit_l_16",
    "vit_l_32",
    "convnext_large",
    "convnext_base",
    "swin_b",
    "swin_v2_b",
    "efficientnet_v2_l",
    "efficientnet_v2_m",
    "efficientnet_b7",
    "efficientnet_b6",
    "wide_resnet101_2",
    "resnext101_64x4d",
    "resnext101_32x8d",
    "vgg16",
    "vgg16_bn",
    "vgg19",
    "vgg19_bn",
}
KERAS_SIZE = {"InceptionV3": 96, "InceptionResNetV2": 96, "Xception": 96}
KERAS_LARGE = {
    "ConvNeXtXLarge",
    "ConvNeXtLarge",
    "ConvNeXtBase",
    "EfficientNetV2L",
    "EfficientNetV2M",
    "EfficientNetB7",
    "EfficientNetB6",
    "NASNetLarge",
}
# Keras applications with their preprocessing inside the model take [0, 255] images.
KERAS_0_255 = ("EfficientNet", "ConvNeXt", "MobileNetV3")

# timm: ~50 families, small members; (name, size, kwargs). Size None: the model's own input size.
TIMM = [
    # the families issue #9 names first
    ("densenet121", 64, {}),
    ("maxvit_nano_rw_256", None, {}),
    ("levit_128s", None, {}),
    ("convmixer_768_32", 64, {}),
    ("repvgg_a0", 64, {}),
    ("fastvit_t8", 64, {}),
    ("mobileone_s0", 64, {}),
    ("xcit_nano_12_p16_224", None, {}),
    ("dm_nfnet_f0", 64, {}),
    ("nf_resnet26", 64, {}),
    ("eca_nfnet_l0", 64, {}),
    ("edgenext_xx_small", 64, {}),
    ("convnextv2_atto", 64, {}),
    ("efficientvit_b0", 64, {}),
    ("efficientvit_m0", None, {}),
    ("coat_lite_tiny", None, {}),
    ("hrnet_w18_small", 64, {}),
    ("resnest14d", 64, {}),
    ("swin_tiny_patch4_window7_224", None, {}),
    # the rest of the sample
    ("resnet18", 64, {}),
    ("resnet50d", 64, {}),
    ("resnetv2_50", 64, {}),
    ("regnetx_002", 64, {}),
    ("regnety_002", 64, {}),
    ("regnetz_b16", 64, {}),
    ("efficientnet_b0", 64, {}),
    ("tf_efficientnetv2_b0", 64, {}),
    ("mobilenetv3_small_100", 64, {}),
    ("mobilenetv3_large_100", 64, {}),
    ("mobilenetv4_conv_small", 64, {}),
    ("convnext_atto", 64, {}),
    ("vit_tiny_patch16_224", 64, {"img_size": 64}),
    ("deit_tiny_patch16_224", 64, {"img_size": 64}),
    ("deit3_small_patch16_224", 64, {"img_size": 64}),
    ("eva02_tiny_patch14_224", 56, {"img_size": 56}),
    ("cait_xxs24_224", 64, {"img_size": 64}),
    ("swinv2_cr_tiny_ns_224", None, {}),
    ("coat_tiny", None, {}),
    ("ghostnet_100", 64, {}),
    ("ghostnetv2_100", 64, {}),
    ("mixnet_s", 64, {}),
    ("mnasnet_small", 64, {}),
    ("dla34", 64, {}),
    ("dpn68", 64, {}),
    ("cspdarknet53", 64, {}),
    ("res2net50_14w_8s", 64, {}),
    ("skresnet18", 64, {}),
    ("selecsls42b", 64, {}),
    ("rexnet_100", 64, {}),
    ("lcnet_050", 64, {}),
    ("hardcorenas_a", 64, {}),
    ("inception_v3", 96, {}),
    ("xception41", 96, {}),
    ("ese_vovnet19b_dw", 64, {}),
    ("tresnet_m", 64, {}),
    ("poolformer_s12", 64, {}),
    ("hgnetv2_b0", 64, {}),
    ("inception_next_tiny", 64, {}),
    ("starnet_s1", 64, {}),
    ("gernet_s", 64, {}),
    ("seresnext26d_32x4d", 64, {}),
    ("repghostnet_050", 64, {}),
    ("mambaout_femto", 64, {}),
    ("mobilevit_xxs", 64, {}),
    ("mobilevitv2_050", 64, {}),
    ("pvt_v2_b0", 64, {}),
    ("pit_ti_224", None, {}),
    ("tnt_s_patch16_224", None, {}),
    ("crossvit_tiny_240", None, {}),
    ("twins_svt_small", None, {}),
    ("mvitv2_tiny", None, {}),
    ("gcvit_xxtiny", None, {}),
    ("nest_tiny", None, {}),
    ("convit_tiny", None, {}),
    ("volo_d1_224", None, {}),
    ("focalnet_tiny_srf", None, {}),
    ("davit_tiny", None, {}),
    ("efficientformer_l1", None, {}),
    ("efficientformerv2_s0", None, {}),
    ("tiny_vit_5m_224", None, {}),
    ("sequencer2d_s", None, {}),
    ("mixer_s16_224", None, {}),
    ("resmlp_12_224", None, {}),
    ("gmlp_ti16_224", None, {}),
    ("hiera_tiny_224", None, {}),
    ("botnet26t_256", None, {}),
    ("halonet26t", None, {}),
    ("nextvit_small", None, {}),
    ("vgg11", 224, {}),  # AdaptiveAvgPool to 7x7 exports only when it divides the feature map
]


def catalogue() -> list[Arch]:
    """Every architecture of the sweep, small ones first within each source."""
    archs = []
    from torchvision import models as tvm

    for name in tvm.list_models(module=tvm):
        archs.append(
            Arch(
                "torchvision",
                name,
                TORCHVISION_SIZE.get(name, 64),
                TORCHVISION_KWARGS.get(name, {}),
                name in TORCHVISION_LARGE,
            )
        )
    import keras

    for name in sorted(n for n in dir(keras.applications) if n[0].isupper()):
        archs.append(Arch("keras", name, KERAS_SIZE.get(name, 64), {}, name in KERAS_LARGE))
    for name, size, kwargs in TIMM:
        archs.append(Arch("timm", name, size or 0, kwargs))
    return sorted(archs, key=lambda a: a.large)  # stable: the catalogue's order within a tier


# ----------------------------------------------------------------------------- one architecture
@dataclass
class Result:
    source: str
    name: str
    size: int = 0
    params_m: float | None = None
    exported: bool = False
    compiled: bool = False
    stage: str = ""  # where it failed: build | export | compile | gradient | timeout | crash
    reason: str = ""  # first line of the error (ours name the node and op)
    self_check: str = ""
    err_framework: float | None = None  # ours vs the framework's float32 autograd
    err_float64: float | None = None  # ours vs float64 torch autograd
    framework_vs_float64: float | None = None
    score_err: float | None = None
    matched: bool = False
    note: str = ""
    seconds: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.source}:{self.name}"


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| relative to the scale of b."""
    scale = float(np.max(np.abs(b))) or 1.0
    return float(np.max(np.abs(np.asarray(a, np.float64) - b))) / scale


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    line = text.splitlines()[0]
    return f"{type(e).__name__}: {line}"[:400]


def _build_torch(arch: Arch):
    import torch

    torch.manual_seed(SEED)
    if arch.source == "torchvision":
        from torchvision import models as tvm

        module = tvm.get_model(arch.name, weights=None, **arch.kwargs)
    else:
        import timm

        module = timm.create_model(arch.name, pretrained=False, **arch.kwargs)
    # torchvision's ViTs and several timm models initialise the classifier head to zero, which
    # makes every input gradient exactly zero and the comparison empty: give such all-zero
    # weight matrices seeded random values (biases and 1-D scales keep their initialisation).
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim >= 2 and not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=generator))
    return module.eval()


def _torch_gradient(module, x: np.ndarray, target: np.ndarray, dtype):
    import torch

    xt = torch.tensor(x, dtype=dtype, requires_grad=True)
    z = module(xt)
    score = z[torch.arange(len(x)), torch.as_tensor(target)]
    score.sum().backward()
    return score.detach().double().numpy(), xt.grad.double().numpy()


def _run_torch(arch: Arch, work: Path, res: Result) -> None:
    import torch

    from exporters import torch as torch_export

    torch.set_num_threads(1)
    t = time.perf_counter()
    module = _build_torch(arch)
    if arch.size == 0:  # the model's own input size (timm's pretrained config)
        size = module.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
        res.size = int(size)
    n_params = sum(p.numel() for p in module.parameters())
    res.params_m = round(n_params / 1e6, 2)
    res.seconds["build"] = round(time.perf_counter() - t, 1)
    weight_bytes = 4 * (n_params + sum(b.numel() for b in module.buffers()))
    if weight_bytes > MAX_WEIGHT_BYTES:
        res.stage = "export"
        res.reason = (
            f"not attempted: {weight_bytes / 1024**3:.1f} GiB of weights exceed the 2 GiB of one "
            "ONNX protobuf (the exporters write the model in one piece, no external data)"
        )
        return
    wrapped = torch_export.normalized(module, IMAGENET_MEAN, IMAGENET_STD, ndim=3).eval()
    path = work / "model.onnx"
    t = time.perf_counter()
    try:
        torch_export.export(
            module, path, input_shape=(3, res.size, res.size), mean=IMAGENET_MEAN, std=IMAGENET_STD, seed=SEED
        )
    except Exception as e:
        res.stage, res.reason = "export", _first_line(e)
        return
    finally:
        res.seconds["export"] = round(time.perf_counter() - t, 1)
    res.exported = True

    rng = np.random.default_rng(SEED)
    x = rng.uniform(0, 1, size=(BATCH, 3, res.size, res.size)).astype(np.float32)
    ours = _compile_and_gradient(path, x, rng, res)
    if ours is None:
        return
    target, scores, grads = ours
    t = time.perf_counter()
    ref_scores, ref32 = _torch_gradient(wrapped, x, target, torch.float32)
    res.seconds["torch"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    # a fresh build (same seed, same weights), not a deepcopy: some models cache non-leaf tensors
    # (attention biases) in eval mode, which neither deepcopy nor .double() converts
    wrapped64 = torch_export.normalized(_build_torch(arch), IMAGENET_MEAN, IMAGENET_STD, ndim=3).double()
    _, ref64 = _torch_gradient(wrapped64, x, target, torch.float64)
    del wrapped64
    res.seconds["float64"] = round(time.perf_counter() - t, 1)
    res.score_err = relative_error(scores, ref_scores)
    res.err_framework = relative_error(grads, ref32)
    res.err_float64 = relative_error(grads, ref64)
    res.framework_vs_float64 = relative_error(ref32, ref64)
    _judge(res, ref32)


def _run_keras(arch: Arch, work: Path, res: Result) -> None:
    import keras
    import tensorflow as tf

    from exporters import keras as keras_export

    t = time.perf_counter()
    keras.utils.set_random_seed(SEED)
    ctor = getattr(keras.applications, arch.name)
    model = ctor(weights=None, input_shape=(arch.size, arch.size, 3), classifier_activation=None)
    res.params_m = round(model.count_params() / 1e6, 2)
    res.seconds["build"] = round(time.perf_counter() - t, 1)
    input_range = (0.0, 255.0) if arch.name.startswith(KERAS_0_255) else (0.0, 1.0)
    path = work / "model.onnx"
    t = time.perf_counter()
    try:
        keras_export.export(model, path, input_range=input_range, seed=SEED)
    except Exception as e:
        res.stage, res.reason = "export", _first_line(e)
        return
    finally:
        res.seconds["export"] = round(time.perf_counter() - t, 1)
    res.exported = True

    rng = np.random.default_rng(SEED)
    x = rng.uniform(*input_range, size=(BATCH, arch.size, arch.size, 3)).astype(np.float32)
    ours = _compile_and_gradient(path, x, rng, res)
    if ours is None:
        return
    target, scores, grads = ours
    t = time.perf_counter()
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        z = model(xt, training=False)
        s = tf.gather(z, target, axis=1, batch_dims=1)
        loss = tf.reduce_sum(s)
    ref = tape.gradient(loss, xt).numpy()
    res.seconds["tensorflow"] = round(time.perf_counter() - t, 1)
    res.score_err = relative_error(scores, s.numpy())
    res.err_framework = relative_error(grads, ref)
    _judge(res, ref)


def _compile_and_gradient(path: Path, x: np.ndarray, rng, res: Result):
    import engine
    from engine.compile import compile_model

    t = time.perf_counter()
    try:
        model, info = compile_model(path)
    except Exception as e:
        res.stage, res.reason = "compile", _first_line(e)
        return None
    finally:
        res.seconds["compile"] = round(time.perf_counter() - t, 1)
    res.compiled = True
    check = info.self_check
    res.self_check = check.get("status", "")
    if res.self_check != "passed" and check.get("reason"):
        res.self_check += f" ({check['reason'][:120]})"
    t = time.perf_counter()
    try:
        clf = engine.load(path, gradient_model=model, providers=["CPUExecutionProvider"], threads=1)
        target = rng.integers(0, clf.num_classes, len(x))
        scores, grads = clf.gradient(x, target, output="logit")
    except Exception as e:
        res.stage, res.reason = "gradient", _first_line(e)
        return None
    finally:
        res.seconds["gradient"] = round(time.perf_counter() - t, 1)
    return target, scores, grads


def _judge(res: Result, reference: np.ndarray) -> None:
    if not np.any(reference):  # every relative error is 0 / 1: a comparison of nothing
        res.stage = "degenerate"
        res.reason = "the framework's input gradient is exactly zero (dead units at random weights)"
        return
    fw_off = res.framework_vs_float64 is not None and res.framework_vs_float64 > TOL
    if res.err_framework is not None and res.err_framework <= TOL:
        res.matched = True
    elif fw_off and res.err_float64 is not None and res.err_float64 <= TOL:
        res.matched = True
        res.note = "matches float64; the framework's float32 gradient is off"
    else:
        res.stage = "mismatch"
        res.reason = f"gradient error {res.err_framework:.3g} of scale vs the framework"
    if fw_off and not res.note:
        res.note = f"framework float32 is {res.framework_vs_float64:.2g} from float64"


def run_one(arch: Arch, work: Path) -> Result:
    """Measure one architecture in this process (the sweep calls it in a subprocess)."""
    res = Result(arch.source, arch.name, arch.size)
    start = time.perf_counter()
    try:
        (_run_keras if arch.source == "keras" else _run_torch)(arch, work, res)
    except Exception as e:  # a failure of the harness or the model's constructor
        res.stage = res.stage or "build"
        res.reason = _first_line(e)
        res.note = traceback.format_exc().strip().splitlines()[-1][:200]
    res.seconds["total"] = round(time.perf_counter() - start, 1)
    return res


# ----------------------------------------------------------------------------- the sweep
def _worker(key: str, kwargs_json: str, size: int, out: str) -> None:
    source, name = key.split(":", 1)
    arch = Arch(source, name, size, json.loads(kwargs_json))
    with tempfile.TemporaryDirectory(prefix="onnxplain-arch-") as work:
        os.environ["ONNXPLAIN_CACHE_DIR"] = os.path.join(work, "cache")
        res = run_one(arch, Path(work))
    Path(out).write_text(json.dumps(asdict(res)))


def run_isolated(arch: Arch, timeout: float) -> Result:
    """run_one in a subprocess with single-threaded runtimes; a timeout or crash is a row."""
    env = {**os.environ, **SINGLE_THREAD_ENV}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onnxplain-sweep-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            "-m",
            "bench.architectures",
            "--worker",
            arch.key,
            "--worker-kwargs",
            json.dumps(arch.kwargs),
            "--worker-size",
            str(arch.size),
            "--worker-out",
            str(out),
        ]
        # a session of its own, so a timeout ends the worker and the builder it started
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return Result(
                arch.source,
                arch.name,
                arch.size,
                stage="timeout",
                reason=f"no result within {timeout:.0f} s",
                seconds={"total": round(time.perf_counter() - start, 1)},
            )
        if out.exists():
            return Result(**json.loads(out.read_text()))
        tail = [line for line in (stderr or "").strip().splitlines() if line.strip()]
        return Result(
            arch.source,
            arch.name,
            arch.size,
            stage="crash",
            reason=f"worker exited with {proc.returncode}: {tail[-1][:300] if tail else 'no output'}",
            seconds={"total": round(time.perf_counter() - start, 1)},
        )


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.1e}"


def _cause(r: Result) -> str:
    """The failure reason with model-specific details (paths, node names, numbers) blanked, so
    equal causes group together."""
    text = re.sub(r"/\S+\.onnx:\s*", "", r.reason)
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", text)
    text = re.sub(r"\S*/\S*", "…", text)  # node names and source paths
    text = re.sub(r"\b\d[\d.e+-]*\b", "N", text)
    return f"{r.stage}: {text[:140]}"


def summary(results: list[Result]) -> list[str]:
    lines = []
    by_source: dict[str, list[Result]] = {}
    for r in results:
        by_source.setdefault(r.source, []).append(r)
    lines.append("| source | measured | exported | compiled | match framework | match float64 only |")
    lines.append("|---|---|---|---|---|---|")
    for source, rs in [*by_source.items(), ("all", results)]:
        lines.append(
            f"| {source} | {len(rs)} | {sum(r.exported for r in rs)} | {sum(r.compiled for r in rs)} | "
            f"{sum(r.matched and not r.note.startswith('matches float64') for r in rs)} | "
            f"{sum(r.note.startswith('matches float64') for r in rs)} |"
        )
    causes: dict[str, list[str]] = {}
    for r in results:
        if not r.matched:
            causes.setdefault(_cause(r), []).append(r.name)
    if causes:
        lines += ["", "Failure causes, grouped (numbers, paths and quoted names blanked):", ""]
        lines += ["| cause | count | architectures |", "|---|---|---|"]
        for cause, names in sorted(causes.items(), key=lambda kv: -len(kv[1])):
            cell = cause.replace("|", "\\|")
            lines.append(f"| {cell} | {len(names)} | {', '.join(names)} |")
    return lines


def versions() -> str:
    import importlib.metadata as md

    from engine.compile import builder

    names = ["torch", "torchvision", "timm", "tensorflow-cpu", "keras", "tf2onnx", "onnx", "onnxruntime-gpu"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            pass
    return ", ".join(found + [f"builder {builder.BUILDER_REQUIREMENTS[0]}"])


def markdown(results: list[Result], not_run: list[str], versions_line: str = "") -> str:
    head = [
        "# Real architectures: export, compile, input gradients",
        "",
        "Every torchvision classification model, every Keras application and a sample of ~90 timm",
        f"models (about 50 families), with seeded random weights, a batch of {BATCH}, input gradients",
        "of one seeded target logit: exported with `exporters.torch` / `exporters.keras` (whose parity",
        "check compares onnxruntime's logits with the framework's), compiled with",
        "`engine.compile.compile_model` (self-check included), run on onnxruntime's CPU provider.",
        "",
        "Errors are max |ours − reference| / max |reference|. *fw*: the framework's float32 autograd",
        "(torch, or tf.GradientTape for Keras); *f64*: torch autograd on a float64 copy of the module",
        "(torch models only); *fw vs f64*: how far the framework's own float32 gradient is from float64.",
        "oneDNN's float32 convolutions, and ReLU kinks that a rounding difference puts on the other side,",
        "can move a deep network's float32 gradient by ~1e-3 of scale from float64. A model matches",
        f"when *fw* <= {TOL:g}, or, where *fw vs f64* > {TOL:g}, when *f64* <= {TOL:g} (then it says so).",
        "A failure's reason is the first line of the error; the compiler's errors name node and op.",
        "Inputs are 64 px where the architecture allows (its minimum or fixed size otherwise); torch",
        "models get ImageNet normalisation inside the graph and [0, 1] images; Keras applications",
        "with their preprocessing inside get [0, 255] images, the others [0, 1].",
        "",
        "## Running it",
        "",
        "`make sweep` runs everything (hours on 2 cores; niced, one thread per runtime): each",
        "architecture in a subprocess of its own with a timeout, so a crash, hang or out-of-memory kill",
        "costs one row. This file and `docs/architectures.json` are rewritten after every architecture.",
        "A part: `python -m bench.architectures --source timm --names resnet18,vit_tiny_patch16_224`;",
        "`--tier small|large` (large: ~100M+ parameters, run last), `--resume` (skip what the JSON",
        "holds), `--jobs N`, `--timeout S`, `--render` (rewrite this file from the JSON).",
        "`tests/test_architectures.py` runs six of them in `make test`.",
        "",
        "torchvision 0.28.0's wheel on the package index is a CUDA build whose C extension does not",
        "load next to torch's CPU wheel; `import torchvision` then fails while registering fake kernels",
        "for its detection operators (`torchvision::nms`). The classification models never use them, so",
        "the sweep stubs the module `torchvision._meta_registrations` before anything imports",
        "torchvision (timm imports it too).",
        "",
    ]
    if versions_line:
        head += [f"Measured with {versions_line}.", ""]
    head += ["## Summary", "", *summary(results), ""]
    if not_run:
        head += [
            f"Not run in the sweep that wrote this file ({len(not_run)}; stopped at its time limit, or "
            f"measured with a harness error and dropped): {', '.join(not_run)}.",
            "",
        ]
    rows = [
        "## Per architecture",
        "",
        "| source | model | px | params (M) | exported | compiled | self-check | fw | f64 | fw vs f64 | s "
        "| result |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        outcome = "match" if r.matched else f"{r.stage}: {r.reason[:240]}"  # all of it in the JSON
        if r.note and r.matched:
            outcome += f" ({r.note})"
        outcome = outcome.replace("|", "\\|").replace("\n", " ")
        yes = lambda b: "yes" if b else "no"  # noqa: E731
        rows.append(
            f"| {r.source} | {r.name} | {r.size} | {r.params_m if r.params_m is not None else '—'} | "
            f"{yes(r.exported)} | {yes(r.compiled)} | {r.self_check.replace('|', '/') or '—'} | "
            f"{_fmt(r.err_framework)} | {_fmt(r.err_float64)} | {_fmt(r.framework_vs_float64)} | "
            f"{r.seconds.get('total', '—')} | {outcome} |"
        )
    return "\n".join(head + rows) + "\n"


def _write(
    results: list[Result], not_run: list[str], json_path: Path | None, md_path: Path, versions_line: str
) -> None:
    from engine.atomic import atomic_write_bytes

    if json_path is not None:
        atomic_write_bytes(json_path, (json.dumps([asdict(r) for r in results], indent=1) + "\n").encode())
    atomic_write_bytes(md_path, markdown(results, not_run, versions_line).encode())


def main(argv=None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="torchvision,keras,timm", help="comma-separated sources")
    parser.add_argument("--names", default="", help="comma-separated architecture names (default all)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per architecture")
    parser.add_argument("--resume", action="store_true", help="skip architectures the JSON already holds")
    parser.add_argument(
        "--tier", choices=("all", "small", "large"), default="all", help="large: ~100M+ params"
    )
    parser.add_argument("--reverse", action="store_true", help="back to front (a second sweep from the end)")
    parser.add_argument("--jobs", type=int, default=1, help="architectures measured at once (one core each)")
    parser.add_argument("--render", action="store_true", help="only rewrite the markdown from the JSON")
    parser.add_argument("--json", default=str(DEFAULT_JSON))
    parser.add_argument("--markdown", default=str(DEFAULT_MARKDOWN))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-kwargs", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--worker-size", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker, args.worker_kwargs, args.worker_size, args.worker_out)
        return []

    sources = set(args.source.split(","))
    names = set(filter(None, args.names.split(",")))
    everything = catalogue()
    todo = [a for a in everything if a.source in sources and (not names or a.name in names)]
    json_path, md_path = Path(args.json), Path(args.markdown)
    done: dict[str, Result] = {}
    if json_path.exists():  # keep rows of other sources / names; re-measure the chosen ones
        for row in json.loads(json_path.read_text()):
            r = Result(**row)
            done[r.key] = r
    order = {a.key: i for i, a in enumerate(everything)}
    versions_line = versions()
    if args.render:
        results = sorted(done.values(), key=lambda r: order.get(r.key, len(order)))
        _write(results, [a.key for a in everything if a.key not in done], None, md_path, versions_line)
        return results
    if args.resume:
        todo = [a for a in todo if a.key not in done]
    if args.tier != "all":
        todo = [a for a in todo if a.large == (args.tier == "large")]
    if args.reverse:
        todo.reverse()
    pool = ThreadPoolExecutor(max(1, args.jobs))
    futures = [pool.submit(run_isolated, arch, args.timeout) for arch in todo]
    for i, future in enumerate(as_completed(futures), 1):
        res = future.result()
        arch_key = res.key
        done[res.key] = res
        results = sorted(done.values(), key=lambda r: order.get(r.key, len(order)))
        not_run = [a.key for a in everything if a.key not in done]
        _write(results, not_run, json_path, md_path, versions_line)
        status = "match" if res.matched else f"{res.stage}: {res.reason[:120]}"
        print(
            f"[{i}/{len(todo)}] {arch_key} {res.seconds.get('total', '?')} s "
            f"fw={_fmt(res.err_framework)} f64={_fmt(res.err_float64)} {status}",
            flush=True,
        )
    pool.shutdown()
    return list(done.values())


if __name__ == "__main__":
    main()
