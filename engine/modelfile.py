"""Reading a model file as untrusted input: size bounds, external data confined to the model's
folder, exactly one float input, one (N, K) output. Errors name the file and what is wrong.

Every place a tensor can live is walked — initializers, sparse initializers, TENSOR / TENSORS /
SPARSE_TENSOR(S) attributes, every subgraph (GRAPH / GRAPHS attributes, to any depth) and local
functions — and every external-data location is resolved against the model's own folder only
(never the current directory; symbolic links that leave the folder are refused). The data is read
here, once, into the in-memory model, so the runtimes and onnx.checker never open a file.
A model given as bytes or a ModelProto may use external data only when the caller names its
folder (``base_dir``).

``ModelFile.sha256`` identifies the model by content: the sha256 of the .onnx bytes, followed, for
a model with external data, by every external segment it reads (in graph order). A change of the
weights therefore changes the digest, the gradient-model cache key and the binding of a
standalone gradient model, even when the .onnx file itself is unchanged.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from .adapt import adapt
from .errors import ModelFileError

# protobuf cannot serialise a message over 2 GiB, and onnxruntime is handed serialised bytes: the
# .onnx file and its external data together must stay below that.
MAX_MODEL_BYTES = 2 * 1024**3 - 1
# A graph this large is far beyond any image classifier (EfficientNet-Lite0: 125 nodes, ViT-L: ~2,000);
# refusing it keeps a hostile file from tying up the compiler for minutes.
MAX_NODES = 50_000


@dataclass
class ModelFile:
    path: Path | None
    model: onnx.ModelProto  # every tensor inline: no external references remain
    sha256: str
    input_name: str
    input_dims: list  # including the batch dim; ints or symbolic strings
    output_name: str
    num_classes: int
    data_files: tuple[Path, ...] = ()  # external-data files read (resolved), for output checks
    notes: tuple[str, ...] = ()  # what engine.adapt inferred or rewrote, with the reason
    inferred_range: tuple[float, float] | None = None  # implied by the input dtype (uint8: 0..255)
    fixed_batch: onnx.ModelProto | None = None  # before the batch-1 rewrite, for the runtime's fallback

    @property
    def batch_dim(self):
        return self.input_dims[0]

    @property
    def where(self) -> str:
        return str(self.path) if self.path else "model"


def read_model(
    source: str | os.PathLike | onnx.ModelProto | bytes, *, base_dir: str | os.PathLike | None = None
) -> ModelFile:
    """Load and validate a classifier. ``source``: a path, serialized bytes, or a ModelProto.

    ``base_dir``: the folder external data is read from for bytes / ModelProto sources (a path's
    own folder is always used for a path; passing another one for a path is an error)."""
    path = None
    if isinstance(source, onnx.ModelProto):
        data, where = source.SerializeToString(), "model"
        model = onnx.ModelProto()
        model.CopyFrom(source)  # the caller's proto is never modified
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data, where = bytes(source), "model bytes"
        model = _parse(data, where)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        where = str(path)
        data = read_model_bytes(path)
        model = _parse(data, where)
        if base_dir is not None and Path(base_dir).resolve() != path.parent.resolve():
            raise ModelFileError(
                f"{where}: base_dir is only for in-memory models; a file reads its own folder"
            )
        base_dir = path.parent
    else:
        raise ModelFileError(
            f"a model must be a path, bytes or an onnx.ModelProto, got {type(source).__name__}"
        )
    count = sum(len(g.node) for g, _ in _graphs(model))
    if count > MAX_NODES:
        raise ModelFileError(f"{where}: {count} nodes exceeds the {MAX_NODES}-node limit for a classifier")
    digest = hashlib.sha256(data)
    files = _load_external_data(model, base_dir, where, digest, budget=MAX_MODEL_BYTES - len(data))
    try:
        onnx.checker.check_model(model)
    except Exception as e:  # ValidationError, and C++ errors on malformed subgraphs
        first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        raise ModelFileError(f"{where}: not a valid ONNX model: {first}") from e
    inits = {i.name for i in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in inits]
    adapted = adapt(model, inputs[0]) if len(inputs) == 1 else None
    mf = _describe(path, model, digest.hexdigest(), where, files)
    if adapted is not None:
        mf.notes = tuple(adapted.notes)
        mf.inferred_range = adapted.input_range
        mf.fixed_batch = adapted.fixed_batch
    return mf


def regular_file(path: Path, what: str = "file", error: type[Exception] = ModelFileError) -> os.stat_result:
    """stat() of a path that must be a regular file (a named pipe or device would block or never end)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except OSError as e:
        raise error(f"{path}: cannot read {what}: {e.strerror or e}") from e
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (pipe, socket or device)"
        raise error(f"{path}: {kind} (the {what} must be a regular file)")
    return st


def read_model_bytes(path: Path, what: str = "model file") -> bytes:
    """The bytes of a model file, refusing missing and non-regular files and files over the limit."""
    path = Path(path)
    size = regular_file(path, what).st_size
    if size > MAX_MODEL_BYTES:
        raise ModelFileError(f"{path}: {size} bytes exceeds the {MAX_MODEL_BYTES}-byte limit")
    with open(path, "rb") as f:
        data = f.read(MAX_MODEL_BYTES + 1)  # the file may grow between stat and read
    if len(data) > MAX_MODEL_BYTES:
        raise ModelFileError(f"{path}: exceeds the {MAX_MODEL_BYTES}-byte limit")
    return data


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as e:  # protobuf raises DecodeError on truncated or corrupt bytes
        raise ModelFileError(f"{where}: not an ONNX model (corrupt or truncated protobuf: {e})") from e
    if not model.HasField("graph") or not model.graph.node:
        raise ModelFileError(f"{where}: not an ONNX model (no graph or an empty graph)")
    return model


# ------------------------------------------------------------------------ where tensors live


def _graphs(model: onnx.ModelProto) -> Iterator[tuple[onnx.GraphProto, str]]:
    """The main graph, every subgraph to any depth, and the graphs inside local functions
    (iteratively: a deeply nested file cannot exhaust Python's recursion limit)."""
    stack: list[tuple[onnx.GraphProto, str]] = [(model.graph, "graph")]
    for f in model.functions:
        holder = onnx.GraphProto(node=f.node)  # functions hold nodes, not a graph: walk them alike
        stack.append((holder, f"function {f.name!r}"))
    while stack:
        g, owner = stack.pop()
        yield g, owner
        for node in g.node:
            for a in node.attribute:
                if a.HasField("g"):
                    stack.append((a.g, f"{owner} / node {node.name!r} attribute {a.name!r}"))
                stack.extend((sg, f"{owner} / node {node.name!r} attribute {a.name!r}") for sg in a.graphs)


def _tensors(model: onnx.ModelProto) -> Iterator[tuple[TensorProto, str]]:
    """(tensor, description) for every tensor of the model, whatever field holds it."""
    for g, owner in _graphs(model):
        for t in g.initializer:
            yield t, f"{owner}: initializer {t.name!r}"
        for s in g.sparse_initializer:
            yield s.values, f"{owner}: sparse initializer {s.values.name!r}"
            yield s.indices, f"{owner}: sparse initializer {s.values.name!r} (indices)"
        for node in g.node:
            for a in node.attribute:
                here = f"{owner}: node {node.name!r} attribute {a.name!r}"
                if a.HasField("t"):
                    yield a.t, here
                yield from ((t, here) for t in a.tensors)
                sparse = ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + list(a.sparse_tensors)
                for s in sparse:
                    yield s.values, here
                    yield s.indices, here + " (indices)"


def _is_external(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL or len(t.external_data) > 0


def _load_external_data(model, base_dir, where, digest, budget: int) -> tuple[Path, ...]:
    """Read every external segment into its tensor (confined to ``base_dir``); feed ``digest``."""
    external = [(t, here) for t, here in _tensors(model) if _is_external(t)]
    if not external:
        return ()
    if base_dir is None:
        raise ModelFileError(
            f"{where}: {external[0][1]} uses external data; an in-memory model reads external data only "
            "from a folder the caller names (engine.load(..., base_dir=FOLDER)) — or load it from its file"
        )
    root = Path(base_dir).resolve()
    handles: dict[Path, object] = {}
    try:
        for t, here in external:
            target, offset, length = _segment(t, here, root, where)
            f = handles.get(target)
            if f is None:
                try:
                    regular_file(target, "external data file")
                except ModelFileError as e:
                    raise ModelFileError(f"{where}: {here}: {e}") from None
                f = handles[target] = open(target, "rb")  # closed below
            size = os.fstat(f.fileno()).st_size
            if length is None:
                length = size - offset
            if offset + length > size:
                raise ModelFileError(
                    f"{where}: {here} reads bytes {offset}..{offset + length} of {target.name!r}, "
                    f"which has {size}"
                )
            expected = _expected_bytes(t)
            if expected is not None and expected != length:
                raise ModelFileError(
                    f"{where}: {here} has dims {list(t.dims)} ({expected} bytes) but its external "
                    f"segment holds {length} bytes"
                )
            budget -= length
            if budget < 0:
                raise ModelFileError(
                    f"{where}: the model and its external data exceed the {MAX_MODEL_BYTES}-byte limit"
                )
            f.seek(offset)
            raw = f.read(length)
            digest.update(raw)
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
            t.raw_data = raw
    finally:
        for f in handles.values():
            f.close()
    return tuple(handles)


def _segment(t: TensorProto, here: str, root: Path, where: str) -> tuple[Path, int, int | None]:
    entries = {e.key: e.value for e in t.external_data}
    location = entries.get("location")
    if not location:
        raise ModelFileError(f"{where}: {here} has external data without a location")
    if "\x00" in location or os.path.isabs(location) or Path(location).drive:
        raise ModelFileError(
            f"{where}: {here} points at external data {location!r} outside the model's folder; "
            "refusing to read it"
        )
    target = (root / location).resolve()  # follows symbolic links: the target must stay inside too
    if not target.is_relative_to(root) or target == root:
        raise ModelFileError(
            f"{where}: {here} points at external data {location!r} outside the model's folder; "
            "refusing to read it"
        )
    try:
        offset = int(entries.get("offset", "0"))
        length = int(entries["length"]) if "length" in entries else None
    except ValueError:
        raise ModelFileError(f"{where}: {here} has a non-integer external-data offset or length") from None
    if offset < 0 or (length is not None and length < 0):
        raise ModelFileError(f"{where}: {here} has a negative external-data offset or length")
    if not target.exists():
        raise ModelFileError(f"{where}: external data file {location!r} for {here} is missing")
    return target, offset, length


def _expected_bytes(t: TensorProto) -> int | None:
    """Raw byte size implied by dims and dtype (None for strings and unknown types)."""
    try:
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
    except Exception:
        return None
    if dtype.kind in "OUS":
        return None
    count = int(np.prod([int(d) for d in t.dims], dtype=np.int64)) if len(t.dims) else 1
    if t.data_type in (TensorProto.INT4, TensorProto.UINT4):
        return (count + 1) // 2
    return count * dtype.itemsize


# ------------------------------------------------------------------------ the classifier contract


def _describe(path, model, digest, where, files) -> ModelFile:
    g = model.graph
    inits = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    if len(inputs) != 1:
        names = [i.name for i in inputs]
        raise ModelFileError(
            f"{where}: a classifier must have exactly one input, found {len(inputs)}: {names}"
        )
    inp = inputs[0]
    if inp.type.tensor_type.elem_type != TensorProto.FLOAT:
        dtype = TensorProto.DataType.Name(inp.type.tensor_type.elem_type)
        raise ModelFileError(
            f"{where}: input {inp.name!r} has dtype {dtype}; onnxplain needs float32 "
            "inputs (differentiable); embed token ids outside the model"
        )
    dims = _dims(inp)
    if dims is None or len(dims) < 2:
        raise ModelFileError(f"{where}: input {inp.name!r} needs a known rank >= 2 (batch first), got {dims}")
    if any(isinstance(d, int) and d < 0 for d in dims):
        raise ModelFileError(f"{where}: input {inp.name!r} has a negative dimension: {dims}")
    if len(g.output) != 1:
        raise ModelFileError(
            f"{where}: a classifier must have exactly one output (the logits), found "
            f"{[o.name for o in g.output]}"
        )
    out = g.output[0]
    odims = _dims(out)
    if odims is None or len(odims) != 2 or not isinstance(odims[1], int) or odims[1] < 2:
        raise ModelFileError(
            f"{where}: output {out.name!r} has shape {odims}; a classifier output must be (batch, K) "
            "logits with a static K >= 2"
        )
    if out.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ModelFileError(f"{where}: output {out.name!r} must be float32 logits")
    return ModelFile(path, model, digest, inp.name, dims, out.name, odims[1], files)


def _dims(vi):
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "batch") for d in t.shape.dim]
