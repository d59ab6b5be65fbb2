"""Classifier: an ONNX classifier and its gradient models on onnxruntime.

``load(path)`` reads the model as untrusted input, its onnxplain metadata (layout, range,
labels), and prepares sessions lazily: the forward model for ``predict``, a compiled gradient
model per backward rule for ``gradient``, and a tapped one for ``layer_gradient`` (Grad-CAM).
Every call is validated before the runtime sees it and split into chunks within a memory budget.
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from . import metadata
from .adapt import infer_layout
from .checked import check_float32_range
from .compile import CompiledInfo, head
from .errors import InputError, ModelFileError, OnnxplainError, RuntimeFailure
from .modelfile import ModelFile, read_model, read_model_bytes
from .protocol import OUTPUTS, RULES
from .providers import check_providers, default_providers, env_int, session_options, with_options
from .runtimes import OpenVINOSession, check_runtime

DEFAULT_MEMORY_BUDGET = 2 * 1024**3  # bytes per runtime call (ONNXPLAIN_MEMORY_BUDGET)


def _run_into(sess: ort.InferenceSession, feeds: dict, outputs: dict, where: str = "") -> None:
    """Run ``sess`` with its outputs written straight into the given contiguous numpy views (row
    slices of the caller's result arrays): no per-call output allocation and no copy, which for
    input gradients is a pass over as much memory as the input itself."""
    if not hasattr(sess, "io_binding"):  # another runtime (engine.runtimes): run, then copy
        with _runtime_errors("run", where, "openvino"):
            values = sess.run(list(outputs), feeds)
        for dest, value in zip(outputs.values(), values):
            dest[...] = value
        return
    binding = sess.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, value)
    for name, dest in outputs.items():
        binding.bind_output(name, "cpu", 0, dest.dtype, list(dest.shape), dest.ctypes.data)
    with _runtime_errors("run", where):
        sess.run_with_iobinding(binding)


class _runtime_errors:
    """Turn onnxruntime's own exceptions (Fail, InvalidArgument, ... — plain Exceptions from its
    C++ core) into RuntimeFailure with one line saying what was being done."""

    def __init__(self, doing: str, where: str = "", runtime: str = "onnxruntime"):
        self.doing, self.where, self.runtime = doing, where, runtime

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if e is None or isinstance(e, (OnnxplainError, KeyboardInterrupt, MemoryError)):
            return False
        if not isinstance(e, Exception):
            return False
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
        # OpenVINO puts the useful part (the node, the op) on a later line than the first
        telling = [ln for ln in lines if "While validating" in ln or "failed for" in ln]
        first = " ".join(telling[:2]) if telling else lines[0]
        prefix = f"{self.where}: " if self.where else ""
        message = f"{prefix}{self.runtime} failed to {self.doing}: {type(e).__name__}: {first}"
        raise RuntimeFailure(message) from e


class Classifier:
    """An ONNX classifier with exact input gradients. Build it with ``engine.load``."""

    def __init__(
        self,
        mf: ModelFile,
        *,
        providers=None,
        gradient_model=None,
        batch_size=None,
        threads: int | None = None,
        runtime: str = "onnxruntime",
    ):
        self._mf = mf
        self.runtime = check_runtime(runtime)
        try:
            self.info = metadata.read(mf.model)
        except ValueError as e:
            raise ModelFileError(f"{mf.where}: {e}") from e
        labels = self.info.labels
        if labels is not None and len(labels) != mf.num_classes:
            raise ModelFileError(
                f"{mf.where}: metadata onnxplain.labels has {len(labels)} labels but the model has "
                f"{mf.num_classes} classes"
            )
        self._providers_requested = check_providers(providers) if providers else default_providers()
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 0):
            raise InputError(f"threads must be a non-negative integer, got {threads!r}")
        if threads is None:  # read now, so a bad ONNXPLAIN_THREADS is reported at load
            env_int("ONNXPLAIN_THREADS", 0, minimum=0)
        self._threads = threads
        self._sessions: dict = {}
        self._compiled: dict = {}
        self._overrides: dict = {}  # initializer name -> replacement (with_initializers)
        self._derivations: dict = {}  # gradient model sha256 -> engine.initializers.Derivation list
        self.gradient_model_sha256: str | None = None  # of a standalone gradient model, if given
        if gradient_model is not None:
            self._add_gradient_model(gradient_model)
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1
        ):
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size = int(batch_size) if batch_size else self._default_batch_size()
        if mf.fixed_batch is not None:
            self._verify_dynamic_batch()

    def _verify_dynamic_batch(self) -> None:
        """The batch-1 model was made dynamic (engine.adapt): keep that only if a batch of two
        gives, row for row, what two single rows give; otherwise run one row per call."""
        lo, hi = self.input_range
        x = np.random.default_rng(0).uniform(lo, hi, (2, *self.input_shape)).astype(np.float32)
        try:
            both = self.predict(x)
            rows = np.concatenate([self.predict(x[i : i + 1]) for i in range(2)])
            ok = both.shape == rows.shape and np.allclose(
                both, rows, rtol=1e-5, atol=1e-6 * np.abs(rows).max()
            )
        except OnnxplainError:
            ok = False
        if not ok:
            self._mf.model, self._mf.fixed_batch = self._mf.fixed_batch, None
            self._mf.input_dims = [1, *self._mf.input_dims[1:]]
            self._sessions.clear()
            self.batch_size = 1
            self._mf.notes = tuple(
                n
                if "batch axis" not in n
                else "the batch axis is fixed at 1 (a dynamic batch changes "
                "its results): one row per runtime call"
                for n in self._mf.notes
            )
        else:
            self._mf.fixed_batch = None

    # ------------------------------------------------------------------ properties
    @property
    def path(self) -> Path | None:
        return self._mf.path

    @property
    def onnx_model(self) -> onnx.ModelProto:
        """The forward graph this classifier serves (after engine.adapt); do not modify it."""
        return self._mf.model

    @property
    def sha256(self) -> str:
        return self._mf.sha256

    @property
    def data_files(self) -> tuple[Path, ...]:
        """The external-data files the model's weights were read from (outputs must not be these)."""
        return self._mf.data_files

    @property
    def layout(self) -> str | None:
        if self.info.layout:
            return self.info.layout
        return infer_layout(self._mf.input_dims)[0]

    @property
    def notes(self) -> list[str]:
        """What was inferred about a model without (complete) onnxplain metadata, with the reason."""
        notes = list(self._mf.notes)
        if not self.info.layout:
            layout, reason = infer_layout(self._mf.input_dims)
            notes.append(f"layout {layout} inferred: {reason}" if layout else f"layout unknown: {reason}")
        if not self.info.input_range:
            got = self._mf.inferred_range
            notes.append(
                f"input range {list(got)} from the input dtype"
                if got
                else "input range [0, 1] assumed (no metadata)"
            )
        return notes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) if isinstance(d, int) else -1 for d in self._mf.input_dims[1:])

    @property
    def num_classes(self) -> int:
        return self._mf.num_classes

    @property
    def input_range(self) -> tuple[float, float]:
        if self.info.input_range:
            return tuple(self.info.input_range)
        return self._mf.inferred_range or (0.0, 1.0)

    @property
    def labels(self) -> list[str] | None:
        return self.info.labels

    @property
    def providers(self) -> list[str]:
        """Providers actually in use (after onnxruntime's own fallback)."""
        sess = self._session("forward")
        return list(sess.get_providers())

    # ------------------------------------------------------------------ calls
    def predict(self, x: np.ndarray) -> np.ndarray:
        """Logits (N, K), float32."""
        x = self._check_x(x)
        sess = self._session("forward")
        out = np.empty((len(x), self.num_classes), np.float32)
        for s in self._chunks(len(x)):
            _run_into(sess, {self._mf.input_name: x[s]}, {self._mf.output_name: out[s]}, self._mf.where)
        return out

    def gradient(
        self,
        x: np.ndarray,
        target,
        output: str = "logit",
        rule: str = "gradient",
        *,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, ...]:
        """(scores (N,), d score / d x shaped like x) for the target class of each row; with
        ``return_logits`` also the logits (N, K) of the same forward pass (no extra predict).

        ``target``: an int, one class per row, or class weights W (N, K) float: then the score is
        Σ_k W[n, k] · output_k, a vector-Jacobian product through the logits in one pass (for
        any function of the logits, feed W = its gradient w.r.t. them with output="logit")."""
        x = self._check_x(x)
        targets = self._check_target(target, len(x))
        mix = self._check_output(output)
        if rule not in RULES:
            raise InputError(f"unknown rule {rule!r}; use one of {RULES}")
        sess, info = self._gradient_session(rule, None)
        scores = np.empty(len(x), np.float32)
        grads = np.empty_like(x)
        logits = np.empty((len(x), self.num_classes), np.float32) if return_logits else None
        for s in self._chunks(len(x)):
            outputs = {info.scores: scores[s], info.input_gradient: grads[s]}
            if return_logits:
                outputs[info.logits] = logits[s]
            _run_into(sess, self._feeds(x[s], targets[s], mix), outputs, self._mf.where)
        return (scores, grads, logits) if return_logits else (scores, grads)

    def layer_gradient(
        self, x: np.ndarray, target, output: str = "logit", layer: str | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores (N,), activation of ``layer``, d score / d activation). layer=None: the last
        convolutional feature map, in the model's layout; a named tensor comes as the graph
        holds it."""
        x = self._check_x(x)
        targets = self._check_target(target, len(x))
        mix = self._check_output(output)
        if len(x) == 0:
            raise InputError("layer_gradient needs at least one row: the feature map shape comes from a run")
        sess, info = self._gradient_session("gradient", layer or "auto")
        tap_shape = None
        results = []
        for s in self._chunks(len(x)):
            feeds = self._feeds(x[s], targets[s], mix)
            if tap_shape is None:
                tap_shape = self._tap_shape(sess, x[s])
            feeds[head.TAP_DELTA] = np.zeros((len(x[s]), *tap_shape), np.float32)
            with _runtime_errors("run the Grad-CAM gradient model", self._mf.where):
                results.append(sess.run([info.scores, info.tap, info.tap_gradient], feeds))
        scores, act, grad = (np.concatenate(parts) for parts in zip(*results))
        if layer is None and self.layout == "NHWC" and act.ndim == 4:
            # the automatic tap is an ONNX Conv output (channels-first): hand it over in the
            # model's own layout, like everything else a method sees
            act, grad = act.transpose(0, 2, 3, 1), grad.transpose(0, 2, 3, 1)
        return scores, act, grad

    def excitation(
        self, x: np.ndarray, target, layer: str | None = None, contrastive: bool = True
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores (N,), activation A of ``layer``, gradient G of the excitation graph): the
        marginal winning probability there is A · G (engine.compile.excitation). ``layer``: None
        (the last convolutional feature map, as the graph holds it), "input", or a tensor name."""
        from .compile.excitation import run

        return run(self, x, target, layer, contrastive)

    # ------------------------------------------------------------------ internals
    def _feeds(self, x, targets, mix):
        if targets.ndim == 2:  # class weights given (checked in _check_target)
            weights = targets
        else:
            weights = np.zeros((len(x), self.num_classes), np.float32)
            weights[np.arange(len(x)), targets] = 1.0
        return {self._mf.input_name: x, head.CLASS_WEIGHTS: weights, head.OUTPUT_MIX: mix}

    @staticmethod
    def _tap_shape(sess, x):
        dims = next(i for i in sess.get_inputs() if i.name == head.TAP_DELTA).shape[1:]
        if not all(isinstance(d, int) for d in dims):
            raise InputError(f"the Grad-CAM layer has dynamic dims {dims}; export with a static input size")
        return dims

    def _session(self, key, model_bytes=None):
        if key not in self._sessions:
            src = model_bytes if model_bytes is not None else self._mf.model.SerializeToString()
            what = "the gradient model of" if key != "forward" else "the model"
            if key != "forward" and self.runtime == "onnxruntime":
                from .compile.tuning import tune_for_onnxruntime

                src = tune_for_onnxruntime(src)  # its NCHWc-tuned rewrites, exact on onnxruntime
            if self._overrides:
                src = self._replace_initializers(src, gradient=key != "forward")
            with _runtime_errors(f"load {what}", self._mf.where, self.runtime):
                if self.runtime == "openvino":
                    self._sessions[key] = OpenVINOSession(src, self._threads)
                else:
                    self._sessions[key] = ort.InferenceSession(
                        src, session_options(self._threads), providers=with_options(self._providers_requested)
                    )
        return self._sessions[key]

    def with_initializers(self, values: Mapping[str, np.ndarray]) -> Classifier:
        """This classifier with some initializers (weights) replaced: ``{name: array}``, each of the
        original's shape (cast to its dtype). Nothing is recompiled: the same compiled forward and
        gradient graphs run with the new tensor data, and the gradient model's constants computed
        from weights (flipped Conv kernels, folded BatchNormalization) are recomputed from them
        (``engine.initializers``). Replacements stack on this classifier's own. Used by the sanity
        checks (``engine.metrics.sanity``).

        The data is written into the graphs' initializers before each session is built, rather
        than given through ``SessionOptions.add_initializer``: onnxruntime 1.31's NCHWc layout
        pass (optimisation level ALL) reorders a Conv kernel from the graph's own initializer,
        ignoring the added one (measured: the first Conv of a small CNN kept its old weights)."""
        from .initializers import check_overrides

        clone = copy.copy(self)
        clone._sessions = {}  # new sessions over the same compiled models (self._compiled is shared)
        clone._overrides = {**self._overrides, **check_overrides(self._mf.model, values)}
        return clone

    @property
    def replaced_initializers(self) -> tuple[str, ...]:
        """Names of the initializers ``with_initializers`` replaced (empty for the model as loaded)."""
        return tuple(sorted(self._overrides))

    def _replace_initializers(self, model_bytes: bytes, gradient: bool) -> bytes:
        from onnx import numpy_helper

        from .initializers import derivations, gradient_overrides

        model = onnx.load_from_string(model_bytes)
        values = self._overrides
        if gradient:
            digest = hashlib.sha256(model_bytes).hexdigest()
            if digest not in self._derivations:
                self._derivations[digest] = derivations(self._mf.model, model)
            values = gradient_overrides(self._mf.model, model, values, self._derivations[digest])
        for init in model.graph.initializer:
            if init.name in values:
                init.CopyFrom(numpy_helper.from_array(values[init.name], init.name))
        return model.SerializeToString()

    def gradient_model_bytes(self, rule: str = "gradient", layer: str | None = None) -> bytes:
        """The serialized gradient model of backward ``rule`` ("gradient", "guided_backprop",
        "deconvnet"; ``layer``: the Grad-CAM tap, "auto" for the default one): the one given
        (``gradient_model=``, :meth:`add_gradient_model`), else compiled now or taken from the
        compiler cache. Another process loads it with :meth:`add_gradient_model` and needs no
        builder (the Ray audit ships it to its workers). InputError where it was not given and no
        builder is installed."""
        key = (rule, layer)
        if key not in self._compiled:
            if not _builder_available():
                raise InputError(
                    f"no gradient model for rule {rule!r}{' layer ' + layer if layer else ''} was given "
                    f"and no builder is installed; compile it with `onnxplain compile MODEL --rule {rule}`"
                )
            from .compile.cache import cached_gradient_model

            data = cached_gradient_model(self._mf, rule=rule, layer=layer)
            self._compiled[key] = (data, CompiledInfo.from_model(onnx.load_from_string(data)))
        return self._compiled[key][0]

    def add_gradient_model(self, source) -> None:
        """Use the gradient model ``source`` (a path, bytes or ModelProto written by ``onnxplain
        compile`` or :meth:`gradient_model_bytes`) for its rule and layer from now on. InputError
        when it is not an onnxplain gradient model or was compiled from another model."""
        self._add_gradient_model(source)

    def _add_gradient_model(self, source) -> None:
        if isinstance(source, onnx.ModelProto):
            model, where = source, "gradient model"
        else:
            where = "gradient model bytes" if isinstance(source, bytes) else str(source)
            raw = source if isinstance(source, bytes) else read_model_bytes(Path(source), "gradient model")
            model = onnx.ModelProto()
            try:
                model.ParseFromString(raw)
            except Exception as e:
                raise InputError(f"{where}: not an ONNX gradient model ({e})") from e
        try:
            info = CompiledInfo.from_model(model)
        except (ValueError, TypeError, RecursionError) as e:
            raise InputError(f"{where}: its onnxplain.gradient metadata does not parse ({e})") from e
        if info is None:
            raise InputError(
                f"{where}: not an onnxplain gradient model (no onnxplain.gradient "
                "metadata); make one with `onnxplain compile MODEL -o GRAD.onnx`"
            )
        if info.source_sha256 != self._mf.sha256:
            raise InputError(
                f"{where}: gradient model was compiled from a different model "
                f"(sha256 {info.source_sha256[:12]}, this model {self._mf.sha256[:12]})"
            )
        entry = (model.SerializeToString(), info)
        self.gradient_model_sha256 = hashlib.sha256(entry[0]).hexdigest()
        if info.tap:  # a standalone model has one tap: it serves layer=None and its own name
            self._compiled[(info.rule, "auto")] = entry
            self._compiled[(info.rule, info.layer)] = entry
        else:
            self._compiled[(info.rule, None)] = entry

    def _gradient_session(self, rule, layer):
        key = (rule, layer)
        if key not in self._compiled:
            if self._compiled and not _builder_available():
                have = sorted(k[0] + (f" with layer {k[1]}" if k[1] else "") for k in self._compiled)
                raise InputError(
                    f"no gradient model for rule {rule!r}{' layer ' + layer if layer else ''}: "
                    f"this Classifier was given {have} and no builder is installed; compile "
                    f"it with `onnxplain compile MODEL --rule {rule}`"
                )
            from .compile.cache import cached_gradient_model

            data = cached_gradient_model(self._mf, rule=rule, layer=layer)
            info = CompiledInfo.from_model(onnx.load_from_string(data))
            self._compiled[key] = (data, info)
        data, info = self._compiled[key]
        return self._session(("gradient",) + key, data), info

    def _default_batch_size(self) -> int:
        budget = env_int("ONNXPLAIN_MEMORY_BUDGET", DEFAULT_MEMORY_BUDGET, minimum=1, sizes=True)
        per_example = _activation_bytes_per_example(self._mf.model)
        return int(max(1, min(1024, budget // max(per_example, 1))))

    def _chunks(self, n):
        """Equal chunks of at most ``batch_size`` rows (8 rows at a budget of 7: 4 + 4, not 7 + 1);
        none for an empty batch (the results are empty, the model is not run)."""
        if n == 0:
            return []
        count = -(-n // (self.batch_size or n or 1))
        bounds = np.linspace(0, n, count + 1).round().astype(int)
        return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]

    def _check_x(self, x) -> np.ndarray:
        x = np.asarray(x)
        if x.dtype.kind != "f":
            raise InputError(f"input must be floating point, got dtype {x.dtype}")
        check_float32_range(x)
        expected = self.input_shape
        if x.ndim != len(expected) + 1:
            raise InputError(
                f"input must be a batch of shape (N, {', '.join(map(str, expected))}), got shape {x.shape}"
            )
        got = x.shape[1:]
        if any(e not in (-1, g) for e, g in zip(expected, got)):
            hint = ""
            if len(got) == 3 and self.layout != "NHWC" and got == (*expected[1:], expected[0]):
                hint = "; it looks like NHWC but this model takes NCHW: use x.transpose(0, 3, 1, 2)"
            elif len(got) == 3 and self.layout == "NHWC" and got == (expected[2], *expected[:2]):
                hint = "; it looks like NCHW but this model's layout is NHWC: use x.transpose(0, 2, 3, 1)"
            raise InputError(f"input shape {x.shape} does not match the model's (N, {expected}){hint}")
        # one reduction first (NaN and Inf propagate through a sum); the elementwise scan, which
        # names the first bad index, only when the sum is not finite (or merely overflowed)
        if np.isfinite(x.sum(dtype=np.float64)):
            return np.ascontiguousarray(x, dtype=np.float32)
        bad = ~np.isfinite(x)
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise InputError(f"input holds {int(bad.sum())} NaN/Inf values (first at index {first})")
        return np.ascontiguousarray(x, dtype=np.float32)

    def _check_target(self, target, n) -> np.ndarray:
        t = np.asarray(target)
        if t.ndim == 2:
            if t.shape != (n, self.num_classes) or t.dtype.kind != "f":
                raise InputError(
                    f"class weights must be a float array of shape ({n}, {self.num_classes}), "
                    f"got {t.dtype} {t.shape}"
                )
            if not np.isfinite(t).all():
                raise InputError("class weights hold NaN or Inf")
            return np.ascontiguousarray(t, dtype=np.float32)
        if t.ndim == 0:
            t = np.full(n, t)
        if t.shape != (n,):
            raise InputError(f"target must be an int or one class per row ({n}), got shape {t.shape}")
        if t.dtype.kind not in "iu":
            if t.dtype.kind == "f" and np.all(t == np.round(t)):
                t = t.astype(np.int64)
            else:
                raise InputError(f"target must hold class indices (integers), got dtype {t.dtype}")
        out_of_range = (t < 0) | (t >= self.num_classes)
        if out_of_range.any():
            raise InputError(
                f"class index {int(t[out_of_range][0])} out of range: the model has "
                f"{self.num_classes} classes (0..{self.num_classes - 1})"
            )
        return t.astype(np.int64)

    @staticmethod
    def _check_output(output) -> np.ndarray:
        if output not in OUTPUTS:
            raise InputError(f"unknown output {output!r}; use one of {OUTPUTS}")
        mix = np.zeros(3, np.float32)
        mix[head.OUTPUT_INDEX[output]] = 1.0
        return mix

    def __repr__(self) -> str:
        name = self.path.name if self.path else "<bytes>"
        return (
            f"Classifier({name}, input {self.input_shape} {self.layout or ''}, "
            f"{self.num_classes} classes, batch_size={self.batch_size})"
        )


def _builder_available() -> bool:
    from .compile.builder import BuilderError, builder_python

    try:
        builder_python()
        return True
    except BuilderError:
        return False


def _activation_bytes_per_example(model: onnx.ModelProto) -> int:
    """Rough peak bytes of a gradient call for one example: the backward pass keeps the forward
    activations alive, plus a few gradient-sized temporaries of the largest tensor. A tensor whose
    shape is unknown counts as large as the input."""
    from .compile.graph import infer_shapes
    from .compile.rewrites import fold_constant_subgraphs

    shapes = infer_shapes(fold_constant_subgraphs(model))
    inp = next(i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer})
    input_size = int(np.prod([d.dim_value or 1 for d in inp.type.tensor_type.shape.dim[1:]]))
    sizes = [input_size]
    for node in model.graph.node:
        for name in node.output:
            dims = shapes.get(name)
            known = dims and all(isinstance(d, int) and d > 0 for d in dims[1:])
            sizes.append(int(np.prod(dims[1:])) if known else input_size)
    return (sum(sizes) + 4 * max(sizes)) * 4


def load(
    model,
    *,
    providers=None,
    gradient_model=None,
    batch_size: int | None = None,
    threads: int | None = None,
    base_dir: str | os.PathLike | None = None,
    runtime: str = "onnxruntime",
) -> Classifier:
    """Load an ONNX classifier. ``gradient_model``: a gradient model written by
    ``onnxplain compile`` (no builder needed then). ``batch_size``: rows per runtime call
    (default: from a memory budget, ONNXPLAIN_MEMORY_BUDGET bytes). ``base_dir``: the folder
    an in-memory model (bytes, ModelProto) reads its external data from; a file uses its own.
    ``runtime``: "onnxruntime" (``providers`` apply) or "openvino" (its CPU plugin)."""
    if isinstance(model, Classifier):
        return model
    return Classifier(
        read_model(model, base_dir=base_dir),
        providers=providers,
        gradient_model=gradient_model,
        batch_size=batch_size,
        threads=threads,
        runtime=runtime,
    )
