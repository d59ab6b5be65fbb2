"""An ONNX classifier's weights as data: blocks, seeded re-draws, and the gradient model's copies.

The sanity checks (docs/sanity-checks.md) re-initialise weights and recompute attributions.
onnxplain does that without recompiling: onnxruntime's ``SessionOptions.add_initializer`` replaces
an initializer when a session is created, so the same compiled forward and gradient models run with
new weights (``Classifier.with_initializers``). The gradient model keeps the forward weights under
their own names (the builder copies the forward graph), but two compile steps bake constants
computed from weights, which must be recomputed from the new ones:

* the flipped, channel-swapped kernel of a stride-1 ConvGrad (``compile.lowering.conv.flipped_kernel``);
* the Mul/Add factors of an eval-mode BatchNormalization
  (``compile.rewrites.normalization.batchnorm_factors``);
* the transposed MatMul weights of the MatMul gradients (``compile.static_shapes``).

``derivations`` finds them in a compiled model by value (each is recomputed from the original
weights and compared bit for bit), so nothing about the compiled file's naming is assumed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .compile.graph import attrs
from .compile.lowering import flipped_kernel
from .compile.rewrites import batchnorm_factors
from .errors import InputError

BLOCK_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
NORMALISATION_OPS = ("BatchNormalization", "InstanceNormalization", "LayerNormalization")
DISTRIBUTIONS = ("normal", "uniform")
# Name hints of the compiler-made constants computed from weights (compile/lowering/conv.py,
# compile/rewrites/normalization.py, compile/static_shapes.py).
_BAKED_HINTS = ("conv_grad_kernel", "bn_a", "bn_b", "const_transposed")


@dataclass(frozen=True)
class Block:
    """The trainable weights of one Conv/Gemm/MatMul node and of the normalisation after it.

    name: the node's name (or ``op_index`` if unnamed); index: its position among the blocks,
    input side first; weights: initializer names (kernel, bias, a following Add's bias, the
    normalisation's scale and bias; not BatchNormalization's running mean and variance, which are
    statistics, not trained weights)."""

    name: str
    op: str
    index: int
    weights: tuple[str, ...]


def initializer_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every floating-point initializer of the main graph, by name."""
    out = {}
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype.kind == "f":
            out[init.name] = arr
    return out


def find_blocks(model: onnx.ModelProto) -> list[Block]:
    """The model's weight blocks in graph order (input side first).

    A block is a Conv, ConvTranspose, Gemm or MatMul with an initializer among its weight inputs,
    plus what follows it on a single-consumer chain: an Add of an initializer (a MatMul's bias)
    and one normalisation node (BatchNormalization, InstanceNormalization, LayerNormalization:
    their scale and bias)."""
    g = model.graph
    floats = {i.name for i in g.initializer if numpy_helper.to_array(i).dtype.kind == "f"}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def single_consumer(node: onnx.NodeProto) -> onnx.NodeProto | None:
        after = consumers.get(node.output[0], [])
        return after[0] if len(after) == 1 else None

    blocks: list[Block] = []
    taken: set[str] = set()
    for i, node in enumerate(g.node):
        if node.op_type not in BLOCK_OPS or node.domain not in ("", "ai.onnx"):
            continue
        inputs = list(node.input[1:]) if node.op_type != "MatMul" else list(node.input)
        weights = [n for n in inputs if n in floats and n not in taken]
        if not weights:
            continue
        nxt = single_consumer(node)
        if nxt is not None and nxt.op_type == "Add":
            weights += [n for n in nxt.input if n in floats and n not in taken]
            nxt = single_consumer(nxt)
        if nxt is not None and nxt.op_type in NORMALISATION_OPS:
            weights += [n for n in nxt.input[1:3] if n in floats and n not in taken]
        weights = list(dict.fromkeys(weights))
        taken.update(weights)
        blocks.append(Block(node.name or f"{node.op_type}_{i}", node.op_type, len(blocks), tuple(weights)))
    return blocks


_SALT = 0x5A4E17  # "sanity"


def redraw(
    values: Mapping[str, np.ndarray], block: Block, *, distribution: str = "normal", seed: int = 0
) -> dict[str, np.ndarray]:
    """New values for a block's weights, each drawn i.i.d. with the original tensor's mean and
    standard deviation: "normal" N(μ, σ²) or "uniform" U(μ − √3σ, μ + √3σ). A tensor with no
    spread (σ = 0: a zero bias, a unit scale) keeps its value, as a framework's re-initialisation
    would give it. The generator is ``default_rng([seed, block.index, salt])``: a block's new weights
    are the same in the cascading and the independent runs."""
    if distribution not in DISTRIBUTIONS:
        raise InputError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    # The last word is a salt: numpy's SeedSequence ignores trailing zeros, so [seed, 0] would
    # replay default_rng(seed) — the very stream a model's own weights are often drawn from
    # (the redrawn weights then correlate with the trained ones and no method fails the check).
    rng = np.random.default_rng([int(seed), block.index, _SALT])
    out = {}
    for name in block.weights:
        v = np.asarray(values[name])
        mu, sigma = float(v.mean(dtype=np.float64)), float(v.std(dtype=np.float64))
        if sigma == 0:
            out[name] = v.copy()
        elif distribution == "normal":
            out[name] = rng.normal(mu, sigma, v.shape).astype(v.dtype)
        else:
            half = np.sqrt(3.0) * sigma
            out[name] = rng.uniform(mu - half, mu + half, v.shape).astype(v.dtype)
    return out


def check_overrides(model: onnx.ModelProto, values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``values`` as contiguous arrays of each initializer's own dtype and shape, checked."""
    if not isinstance(values, Mapping):
        raise InputError(f"initializer values must be a mapping name -> array, got {type(values).__name__}")
    known = {i.name: i for i in model.graph.initializer}
    out = {}
    for name, value in values.items():
        if name not in known:
            raise InputError(f"initializer {name!r} is not in the model")
        ref = numpy_helper.to_array(known[name])
        arr = np.asarray(value)
        if arr.shape != ref.shape:
            raise InputError(f"initializer {name!r} has shape {ref.shape}, got {arr.shape}")
        if arr.dtype.kind not in "fiu" or (ref.dtype.kind == "f") != (arr.dtype.kind == "f"):
            raise InputError(f"initializer {name!r} is {ref.dtype}, got {arr.dtype}")
        arr = np.ascontiguousarray(arr, dtype=ref.dtype)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise InputError(f"initializer {name!r}: the new value holds NaN or Inf")
        out[name] = arr
    return out


@dataclass(frozen=True)
class Derivation:
    """A gradient-model constant computed from forward weights: ``target = compute(*sources)``
    for each (sources, compute) in ``candidates`` (several when the constants of several nodes
    coincide, e.g. two untrained BatchNormalizations; they must still agree after a change)."""

    target: str
    shape: tuple[int, ...]
    candidates: tuple[tuple[tuple[str, ...], Callable[..., np.ndarray]], ...]

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s for srcs, _ in self.candidates for s in srcs))

    def value(self, weights: Mapping[str, np.ndarray]) -> np.ndarray:
        values = [c(*(weights[s] for s in srcs)).reshape(self.shape) for srcs, c in self.candidates]
        if any(not np.array_equal(values[0], v) for v in values[1:]):
            raise InputError(
                f"gradient model constant {self.target!r} was computed from the weights of several "
                f"nodes ({', '.join('/'.join(srcs) for srcs, _ in self.candidates)}) that were "
                "equal and are no longer: this replacement needs a recompile"
            )
        return values[0]


def _swap_last_axes(v: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.swapaxes(v, -1, -2))


def _candidates(forward: onnx.ModelProto) -> list[tuple[str, tuple[str, ...], Callable[..., np.ndarray]]]:
    """Every constant the compiler may bake from forward weights, as (name hint, sources,
    compute); the hint is the one compile/lowering/conv.py and compile/rewrites/normalization.py
    give the constant's name."""
    found: list[tuple[str, tuple[str, ...], Callable[..., np.ndarray]]] = []
    for node in forward.graph.node:
        a = attrs(node)
        if node.op_type == "Conv" and len(node.input) > 1:
            group = int(a.get("group", 1))
            found.append(("conv_grad_kernel", (node.input[1],), lambda w, g=group: flipped_kernel(w, g)))
        elif node.op_type == "MatMul":  # Wᵀ of the MatMul gradients (compile/static_shapes.py)
            for w in node.input[:2]:
                found.append(
                    ("const_transposed", (w,), lambda v: np.ascontiguousarray(np.swapaxes(v, -1, -2)))
                )
        elif node.op_type == "BatchNormalization" and len(node.input) >= 5:
            eps = float(a.get("epsilon", 1e-5))
            srcs = tuple(node.input[1:5])
            found.append(("bn_a", srcs, lambda *v, eps=eps: batchnorm_factors(*v, eps)[0]))
            found.append(("bn_b", srcs, lambda *v, eps=eps: batchnorm_factors(*v, eps)[1]))
    return found


def derivations(forward: onnx.ModelProto, gradient: onnx.ModelProto) -> list[Derivation]:
    """The gradient model's initializers that hold a function of forward weights, found by value:
    each candidate constant is recomputed from the original weights and compared bit for bit."""
    fwd = initializer_values(forward)
    by_key: dict[tuple, list[tuple[tuple[str, ...], Callable]]] = {}
    for hint, sources, compute in _candidates(forward):
        if not all(s in fwd for s in sources):
            continue  # computed from a Constant node or a graph input: not replaceable anyway
        try:
            value = compute(*(fwd[s] for s in sources))
        except (ValueError, TypeError):
            continue
        key = (hint, value.dtype.str, value.size, value.tobytes())
        by_key.setdefault(key, []).append((sources, compute))
    found = []
    for init in gradient.graph.initializer:
        if init.name in fwd or init.data_type != onnx.TensorProto.FLOAT:
            continue
        hint = next((h for h in _BAKED_HINTS if h in init.name), None)
        if hint is None:
            continue
        arr = numpy_helper.to_array(init)
        matches = by_key.get((hint, arr.dtype.str, arr.size, arr.tobytes()))
        if matches:
            found.append(Derivation(init.name, tuple(arr.shape), tuple(matches)))
    return found


def gradient_overrides(
    forward: onnx.ModelProto,
    gradient: onnx.ModelProto,
    overrides: Mapping[str, np.ndarray],
    found: list[Derivation],
) -> dict[str, np.ndarray]:
    """The initializer values to give the gradient model for forward ``overrides``: the replaced
    weights present in it by name plus every derived constant recomputed from the new weights.

    Raises InputError when a replaced weight is neither in the gradient model nor the source of a
    derived constant (its names do not match the forward model's), or when the gradient model
    holds a weight-derived constant onnxplain could not trace back."""
    grad_names = {i.name for i in gradient.graph.initializer}
    fwd = initializer_values(forward)
    sources = {s for d in found for s in d.sources}
    missing = [n for n in overrides if n not in grad_names and n not in sources]
    if missing:
        raise InputError(
            f"the gradient model's weights do not match the forward model's: {', '.join(missing[:5])} "
            "not found in it (was it compiled from a rewritten copy?); recompile it, or replace "
            "the weights in the model file"
        )
    traced = {d.target for d in found}
    untraced = [n for n in grad_names - traced if any(h in n for h in _BAKED_HINTS)]
    if overrides and untraced:
        raise InputError(
            f"the gradient model holds constants computed from weights that could not be traced "
            f"to them ({', '.join(sorted(untraced)[:5])}); replacing weights needs a recompile"
        )
    out = {n: v for n, v in overrides.items() if n in grad_names}
    weights = {**fwd, **overrides}
    for d in found:
        if any(s in overrides for s in d.sources):
            out[d.target] = d.value(weights)
    return out


__all__ = [
    "Block",
    "DISTRIBUTIONS",
    "Derivation",
    "check_overrides",
    "derivations",
    "find_blocks",
    "gradient_overrides",
    "initializer_values",
    "redraw",
]
