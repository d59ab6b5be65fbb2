"""The audit over a Ray cluster: an actor pool computes, the driver alone writes the store.

``audit_on_ray`` runs the same ``Plan`` as ``engine.audit.audit`` and fills the same SQLite store
with the same keys and the same bytes (each chunk is the same images in the same batch, so a
method that draws noise per chunk draws the same noise). The driver:

- loads the Classifier and compiles every gradient model the plan needs (``_needed_gradients``),
  then ships the model bytes and the gradient-model bytes to the actors through Ray's object
  store: compile once, explain anywhere; workers need no builder;
- computes which keys are missing, decodes only the chunks with work and ships the decoded
  inputs as arrays (workers need no access to the image files); or, with images from Ray Data
  (``dataset=``), takes the files' bytes chunk by chunk from the dataset, hashes them, skips the
  chunks that are done and ships the bytes, which the actors decode with ``engine.images``;
- sends work units — one chunk × one method of the plan (its metrics included; the chunk's
  predictions go with its first unit) — to the actors, at most two in flight per actor, and
  writes each row it gets back in its own transaction. A driver killed at any moment loses only
  rows not yet committed; the rerun skips every key present.

Each actor holds its own Classifier (onnxruntime threads = its CPUs; the CUDA provider where the
node has a GPU, chosen by the Classifier). An actor that dies is restarted by Ray and its task
retried there (``max_restarts`` / ``max_task_retries``); a unit whose actor is gone for good is
resubmitted to another. This is the only module that imports ray (``pip install onnxplain[ray]``).
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from ..errors import InputError, RuntimeFailure
from .run import Plan, Progress, Summary, _chunk_keys, _model_record, _picture, full_params
from .store import AuditStore, Row, result_key

# Ray overrides a loopback --node-ip-address with the network interface's address unless this is 0
# in the environment of the driver and of `ray start` (measured on Ray 2.60, Linux).
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
IN_FLIGHT_PER_ACTOR = 2  # one computing, one queued: the actor never waits for the driver
_FORWARD_ONLY = {"rise", "occlusion"}  # methods that never call a gradient model


_restore: list = []  # (previous environment value, previous flag) while a local cluster runs


def start_local(num_cpus: int | None = None) -> None:
    """Start (and connect to) a one-machine Ray cluster on 127.0.0.1 only: no dashboard, every
    listener on loopback. ``stop_local`` stops it.

    Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when it is imported: the environment
    variable reaches the cluster's processes (they start after this), and the driver's own copy
    of the flag is set here too, because ray was imported before (measured: with the variable
    alone the driver's workers and raylet listened on every interface and the runtime-env agent
    on the network address)."""
    from ray._private import ray_constants

    _restore.append((os.environ.get(LOOPBACK_ENV), ray_constants.ENABLE_RAY_CLUSTER))
    os.environ[LOOPBACK_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        ray.init(
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            num_cpus=num_cpus or len(os.sched_getaffinity(0)),
            log_to_driver=False,
            configure_logging=False,
        )
    except BaseException:
        stop_local()
        raise


def stop_local() -> None:
    """Stop the cluster ``start_local`` started and put Ray's loopback setting back."""
    from ray._private import ray_constants

    ray.shutdown()
    if _restore:
        env, flag = _restore.pop()
        ray_constants.ENABLE_RAY_CLUSTER = flag
        if env is None:
            os.environ.pop(LOOPBACK_ENV, None)
        else:
            os.environ[LOOPBACK_ENV] = env


def _needed_gradients(plan: Plan) -> set[tuple[str, str | None]]:
    """The (rule, layer) gradient models the plan's methods call (metrics re-run the methods)."""
    need: set[tuple[str, str | None]] = set()
    for name, params in plan.methods:
        if name in _FORWARD_ONLY:
            continue
        if name in ("guided_backprop", "deconvnet"):
            need.add((name, None))
        elif name == "grad_cam":
            need.add(("gradient", params.get("layer") or "auto"))
        elif name == "excitation_backprop":  # its own graph, keyed as Classifier.excitation keys it
            layer = params.get("layer")
            need.add(("excitation", "auto" if layer is None else (None if layer == "input" else layer)))
        else:
            need.add(("gradient", None))
    return need


def _gradient_models(clf, plan: Plan) -> list[bytes]:
    """Compile (or take the given) gradient models for the plan, on the driver; their bytes, each
    once (a Grad-CAM model serves its "auto" key and its layer's name)."""
    seen: dict[str, bytes] = {}
    for rule, layer in sorted(_needed_gradients(plan), key=str):
        data = clf.gradient_model_bytes(rule, layer)
        seen.setdefault(hashlib.sha256(data).hexdigest(), data)
    return list(seen.values())


def _model_bytes(clf) -> tuple[bytes, bool]:
    """What the workers load, and whether they must take the driver's digest as the model's
    identity: the .onnx file itself when it holds every weight (its digest is then recomputed and
    checked), else the loaded model with its external data inline (whose bytes differ from the
    file's, so the digest of file + data travels with it)."""
    if clf.path is not None and not clf.data_files:
        return Path(clf.path).read_bytes(), False
    return clf.onnx_model.SerializeToString(), True


class AuditWorker:
    """One actor: a Classifier built from shipped bytes, computing work units."""

    def __init__(
        self,
        model: bytes,
        sha256: str,
        pin: bool,
        gradients: list[bytes],
        threads: int,
        batch_size: int,
        max_pixels: int,
    ) -> None:
        from ..images import MAX_PIXELS_VAR
        from ..model import load

        # the driver's image pixel limit, not the node's: the decoder reads it from the environment
        # (this process is the actor's alone)
        os.environ[MAX_PIXELS_VAR] = str(max_pixels)

        # the driver's batch size: the runtime sees the same batches as a one-machine audit
        self.clf = load(model, threads=threads, batch_size=batch_size)
        if pin:  # the model's identity is the digest of its file and external data (see _model_bytes)
            self.clf._mf.sha256 = sha256
        elif self.clf.sha256 != sha256:
            raise InputError(f"the shipped model's sha256 {self.clf.sha256[:12]} is not {sha256[:12]}")
        for data in gradients:
            self.clf.add_gradient_model(data)

    def pid(self) -> int:
        return os.getpid()

    def providers(self) -> list[str]:
        return self.clf.providers

    def run(self, unit: int, x: np.ndarray, digests, chunk_id, keys, missing, plan, stored) -> tuple:
        """One unit over inputs the driver decoded: (unit, rows, no image rows)."""
        from .run import compute_chunk

        rows: list[Row] = []
        compute_chunk(
            self.clf, x, digests, chunk_id, keys, missing, plan, lambda r: rows.append(r) or True, stored.get
        )
        return unit, rows, []

    def run_encoded(
        self, unit: int, encoded, with_images: bool, digests, chunk_id, keys, missing, plan, stored
    ) -> tuple:
        """One unit over encoded image files (Ray Data's bytes): decoded here with engine.images'
        decoder (its pixel limit, bit depths, EXIF orientation and errors); with the chunk's first
        unit the images' pictures and decoding records go back for the driver's images table."""
        from ..images import read_image_bytes

        blobs, names = encoded
        x, decoded = read_image_bytes(
            blobs, names, self.clf.input_shape, self.clf.layout, self.clf.input_range
        )
        images = (
            [(_picture(self.clf, x[j]), decoded[j].to_dict()) for j in range(len(x))] if with_images else []
        )
        return self.run(unit, x, digests, chunk_id, keys, missing, plan, stored)[:2] + (images,)


@dataclass
class _Chunk:
    """One chunk with work, ready to be cut into units."""

    digests: list[str]
    chunk_id: str
    keys: Any  # run._Keys
    missing: set
    method: str  # the actor's method: "run" (decoded arrays) or "run_encoded" (file bytes)
    data: Any  # object ref of the input: the array, or (bytes, names)
    images: list[tuple[str, str, int]] = field(default_factory=list)  # (digest, name, position) to store


@dataclass
class _Counts:
    images: int = 0
    chunks: int = 0
    skipped: int = 0


def audit_on_ray(
    clf_or_path: Any,
    paths: Sequence[str | Path] | None,
    store: AuditStore,
    plan: Plan,
    *,
    dataset: Any = None,
    address: str | None = None,
    workers: int = 2,
    cpus_per_worker: float = 0.5,
    gpus_per_worker: float | None = None,
    read_cpus: float = 0.25,
    retries: int = 3,
    unit_timeout_s: float = 3600.0,
    progress: Progress | None = None,
    on_workers: Callable[[list], None] | None = None,
) -> Summary:
    """Run ``plan`` over images into ``store`` (on the driver) on a Ray cluster.

    The images: either the image files ``paths`` (the driver reads and decodes them), or
    ``dataset`` (``paths`` None): a ``ray.data.Dataset`` of encoded image files with a "bytes"
    column and, for messages and records, a "path" column — what
    ``ray.data.read_binary_files(..., include_paths=True)`` makes — or a URI, local path or list
    of them, read here with ``read_binary_files`` (folders recursively, files with an image
    suffix). The bytes stream through the driver one chunk at a time (it hashes them and skips
    the chunks that are done) and the actors decode them, so no machine holds the data set.
    Image keys are the sha256 of the bytes and chunks are taken in the dataset's order (its
    context's ``preserve_order`` is set), so the same files give the store of the folder audit.

    ``address``: None or "local" starts a local cluster on 127.0.0.1 for this call (and stops it);
    otherwise ``ray.init(address)`` ("auto", "ray://HOST:10001", "HOST:6379"). When Ray is
    already initialised in this process, that cluster is used and left running. ``workers``
    actors of ``cpus_per_worker`` CPUs each (on 2 CPUs keep it below 1 so Ray's own tasks can be
    scheduled); ``gpus_per_worker`` None: 1 when the cluster has a GPU per worker, else 0.
    ``read_cpus``: CPUs of each Ray Data read task (a URI ``dataset``); the actors must leave
    that much free. ``retries``: Ray restarts of a dead actor and retries of its task, and then
    resubmissions of a unit to another actor. ``unit_timeout_s``: the longest wait for any result
    (or for the next chunk of a dataset) before giving up. ``on_workers``: called with the actor
    handles once they are up (monitoring, tests).
    Returns the same ``Summary`` as ``audit``; ``computed`` counts rows this driver committed.
    """
    from ..images import DEFAULT_MAX_PIXELS, MAX_PIXELS_VAR
    from ..model import load
    from ..providers import env_int
    from ..report.record import file_sha256, versions

    plan.validate()
    if workers < 1:
        raise InputError(f"workers must be >= 1, got {workers}")
    if not cpus_per_worker > 0:
        raise InputError(f"cpus_per_worker must be > 0, got {cpus_per_worker}")
    if not read_cpus > 0:
        raise InputError(f"read_cpus must be > 0, got {read_cpus}")
    if (paths is None) == (dataset is None):
        raise InputError("give either image paths or a dataset, not both or neither")
    start = time.perf_counter()
    clf = load(clf_or_path)
    model_sha = clf.sha256
    store.add_model(model_sha, str(clf.path or ""), _model_record(clf, versions()))
    methods = [(m, full_params("method", m, p), p) for m, p in plan.methods]
    metrics = [(m, full_params("metric", m, p), p) for m, p in plan.metrics]
    counts = _Counts()
    if paths is not None:
        paths = [Path(p) for p in paths]
        if not paths:
            raise InputError("no image files given")
        digests = [file_sha256(p) for p in paths]
        chunks = [list(range(i, min(i + plan.chunk, len(paths)))) for i in range(0, len(paths), plan.chunk)]
        counts.images, counts.chunks = len(paths), len(chunks)
        # Which keys are missing, before any cluster is started: a finished audit starts nothing.
        todo = []
        for rows in chunks:
            chunk_id = result_key(images=[digests[i] for i in rows])
            keys = _chunk_keys(model_sha, [digests[i] for i in rows], chunk_id, plan, methods, metrics)
            missing = {k for k in keys.all() if not store.has(k)}
            counts.skipped += len(keys.all()) - len(missing)
            if missing:
                todo.append((rows, chunk_id, keys, missing))
        if not todo:
            return Summary(counts.images, counts.chunks, 0, counts.skipped, time.perf_counter() - start)
    gradients = _gradient_models(clf, plan)
    model, pin = _model_bytes(clf)

    started = source = None
    if not ray.is_initialized():
        if address in (None, "local"):
            start_local()
            started = stop_local
        else:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(address=address, log_to_driver=False, configure_logging=False)
            started = ray.shutdown
    try:
        have = ray.cluster_resources()
        if gpus_per_worker is None:
            gpus_per_worker = 1.0 if have.get("GPU", 0) >= workers else 0.0
        # Ray Data's read tasks need CPU beside the actors, or the run waits forever without an error
        reserve = read_cpus if dataset is not None else 0.0
        for what, each, extra in (("CPU", cpus_per_worker, reserve), ("GPU", gpus_per_worker, 0.0)):
            # actors that cannot all be placed would wait for resources without an error
            if each and workers * each + extra > have.get(what, 0):
                raise InputError(
                    f"workers={workers} × {each} {what} each"
                    f"{f' + {extra} for Ray Data reads' if extra else ''} do not fit the cluster's "
                    f"{have.get(what, 0):g} {what}s; use fewer workers or a smaller share"
                )
        if paths is not None:
            source = _folder_chunks(todo, paths, digests, clf, store)
        else:
            ds = _dataset(dataset, read_cpus)
            source = _dataset_chunks(ds, clf, plan, store, methods, metrics, counts, unit_timeout_s)
        first = next(source, None)  # a Ray Data audit finds out here that nothing is left to do
        if first is None:
            return Summary(counts.images, counts.chunks, 0, counts.skipped, time.perf_counter() - start)
        actor_cls = ray.remote(
            num_cpus=cpus_per_worker,
            num_gpus=gpus_per_worker,
            max_restarts=retries,
            max_task_retries=retries,
        )(AuditWorker)
        refs = (ray.put(model), ray.put(gradients))
        threads = max(1, int(cpus_per_worker))
        max_pixels = env_int(MAX_PIXELS_VAR, DEFAULT_MAX_PIXELS, minimum=1)
        init = (refs[0], model_sha, pin, refs[1], threads, clf.batch_size, max_pixels)
        pool = [actor_cls.remote(*init) for _ in range(workers)]
        ray.get([a.pid.remote() for a in pool], timeout=unit_timeout_s)  # up, or its error now
        if on_workers:
            on_workers(list(pool))
        total = sum(len(_units(m, k, store, with_maps=False)) for _, _, k, m in todo) if paths else None
        chunks = itertools.chain([first], source)
        computed = _drive(pool, chunks, plan, model_sha, store, retries, unit_timeout_s, progress, total)
    finally:
        if source is not None:
            source.close()  # a dataset's reading thread stops before the cluster does
        if started:
            started()
    return Summary(counts.images, counts.chunks, computed, counts.skipped, time.perf_counter() - start)


def _folder_chunks(todo, paths, digests, clf, store) -> Iterator[_Chunk]:
    """The chunks with work of a folder audit, decoded on the driver one at a time."""
    from ..images import read_images

    for rows, chunk_id, keys, missing in todo:
        x, decoded = read_images([paths[i] for i in rows], clf.input_shape, clf.layout, clf.input_range)
        for j, i in enumerate(rows):
            store.add_image(
                digests[i], clf.sha256, str(paths[i]), i, _picture(clf, x[j]), decoded[j].to_dict()
            )
        yield _Chunk([digests[i] for i in rows], chunk_id, keys, missing, "run", ray.put(x))


BYTES, PATH = "bytes", "path"  # the columns of ray.data.read_binary_files(..., include_paths=True)


def _dataset(dataset, read_cpus: float):
    """The Ray Dataset of encoded files, in a fixed order: the chunks, and so every key, depend on it."""
    try:
        import ray.data  # needs pandas and pyarrow: imported only for a dataset
    except ImportError as e:
        raise InputError(f"a Ray Data audit needs ray[data]: pip install 'onnxplain[ray]' ({e})") from None
    if isinstance(dataset, (str, os.PathLike, list, tuple)):
        paths, extensions = _read_arguments(
            [dataset] if isinstance(dataset, (str, os.PathLike)) else list(dataset)
        )
        try:
            dataset = ray.data.read_binary_files(
                paths,
                file_extensions=extensions,
                include_paths=True,
                num_cpus=read_cpus,
            )
        except (FileNotFoundError, ValueError, OSError) as e:  # no such path, no image file under it
            raise InputError(f"Ray Data cannot read {paths}: {e}") from None
        dataset.context.enable_progress_bars = False
    if not isinstance(dataset, ray.data.Dataset):
        raise InputError(
            f"dataset must be a ray.data.Dataset, a URI or a list of paths, got {type(dataset).__name__}"
        )
    # Without it Ray Data hands blocks over as they finish: chunks, and their keys, would change.
    dataset.context.execution_options.preserve_order = True
    return dataset


def _read_arguments(given: list) -> tuple:
    """``read_binary_files``' paths and file extensions for URIs, local paths and local glob
    patterns (Ray Data lists folders, recursively, but does not expand patterns)."""
    from ..images import IMAGE_SUFFIXES

    items: list[str] = []
    for item in given:
        if not isinstance(item, (str, os.PathLike)):
            raise InputError(f"a dataset path must be a string, got {type(item).__name__}")
        item = os.fspath(item)
        if "://" not in item and not os.path.exists(item) and any(c in item for c in "*?["):
            matches = sorted(m for m in glob.glob(item) if os.path.isfile(m))
            if not matches:
                raise InputError(f"{item}: no file matches this pattern")
            items += matches
        else:
            items.append(item)
    if not items:
        raise InputError("the dataset is an empty list of paths")
    return items if len(items) > 1 else items[0], [s.lstrip(".") for s in IMAGE_SUFFIXES]


def _dataset_chunks(
    ds, clf, plan, store, methods, metrics, counts: _Counts, timeout: float
) -> Iterator[_Chunk]:
    """The chunks with work of a Ray Data audit, read and hashed one chunk at a time (the bytes
    of chunks already done are dropped at once); counts every image, chunk and stored key."""
    batches = _within(_hashed_batches(ds, plan.chunk), timeout)
    try:
        yield from _with_work(batches, clf, plan, store, methods, metrics, counts)
    finally:
        batches.close()


def _with_work(batches, clf, plan, store, methods, metrics, counts: _Counts) -> Iterator[_Chunk]:
    position = 0
    for names, blobs, digests in batches:
        chunk_id = result_key(images=digests)
        keys = _chunk_keys(clf.sha256, digests, chunk_id, plan, methods, metrics)
        missing = {k for k in keys.all() if not store.has(k)}
        counts.images += len(digests)
        counts.chunks += 1
        counts.skipped += len(keys.all()) - len(missing)
        if missing:
            images = [(d, n, position + j) for j, (d, n) in enumerate(zip(digests, names))]
            yield _Chunk(digests, chunk_id, keys, missing, "run_encoded", ray.put((blobs, names)), images)
        position += len(digests)


def _hashed_batches(ds, chunk: int) -> Iterator[tuple[list[str], list[bytes], list[str]]]:
    """(names, bytes, sha256) per chunk of ``chunk`` files (iter_batches re-batches exactly)."""
    position = 0
    for batch in ds.iter_batches(batch_size=chunk, batch_format="pyarrow", prefetch_batches=1):
        columns = batch.column_names
        if BYTES not in columns:
            hint = (
                " (a ray.data.read_images dataset: its pixels were decoded by Pillow with no limits; "
                "read the files with ray.data.read_binary_files(..., include_paths=True))"
                if "image" in columns
                else ""
            )
            raise InputError(
                f"the dataset has no {BYTES!r} column of encoded files; its columns: {columns}{hint}"
            )
        blobs = batch.column(BYTES).to_pylist()
        if PATH in columns:
            names = [str(n) for n in batch.column(PATH).to_pylist()]
        else:  # a dataset without paths: its images are named by their position
            names = [f"image {position + j}" for j in range(len(blobs))]
        if any(not isinstance(b, bytes) for b in blobs):
            raise InputError(f"the dataset's {BYTES!r} column holds something else than bytes")
        position += len(blobs)
        yield names, blobs, [hashlib.sha256(b).hexdigest() for b in blobs]


def _within(items: Iterator, timeout: float) -> Iterator:
    """``items`` produced in a thread, each awaited at most ``timeout`` seconds: a Ray Data read
    that cannot be scheduled waits forever without an error; this gives one. Reading and hashing
    the next chunk overlaps the driver's work."""
    box: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def offer(message) -> bool:
        while not stop.is_set():  # the driver may have left: never block on a full queue
            try:
                box.put(message, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer(("item", item)):
                    return
            offer(("end", None))
        except BaseException as e:  # raised in the driver's thread
            offer(("error", e))

    thread = threading.Thread(target=produce, name="onnxplain-ray-data", daemon=True)
    thread.start()
    try:
        while True:
            try:
                kind, item = box.get(timeout=timeout)
            except queue.Empty:
                raise RuntimeFailure(
                    f"Ray Data gave no images within {timeout} s (unit_timeout_s); do the actors "
                    "leave CPUs for its read tasks?"
                ) from None
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=1.0)  # it gives up within 0.1 s unless a read is blocked in Ray Data


def _units(todo, keys_of_chunk, store, with_maps: bool = True):
    """The work units of one chunk: (missing keys, stored maps) per method with work; the
    chunk's predictions go with the first. A method whose maps are all stored but whose metrics
    are not ships its maps (workers have no store)."""
    keys = keys_of_chunk
    units = []
    pred = {k for k in keys.prediction if k in todo}
    for a in range(len(keys.methods)):
        mine = {k for k in keys.method[a] if k in todo}
        for b in range(len(keys.metrics)):
            mine |= {k for k in keys.metric[(a, b)] if k in todo}
        if not mine:
            continue
        stored = {}
        if with_maps and not any(k in todo for k in keys.method[a]):
            stored = {k: store.get(k).data for k in keys.method[a]}
        units.append((mine, stored))
    if pred:
        if units:
            units[0] = (units[0][0] | pred, units[0][1])
        else:
            units.append((pred, {}))
    return units


def _drive(pool, source: Iterator[_Chunk], plan, model_sha, store, retries, timeout, progress, total) -> int:
    """Feed the actors unit by unit, taking the next chunk from ``source`` only when a unit is
    due, and write every row as it comes back (``total``: the units, None where unknown)."""
    queue_: deque = deque()  # (unit id) ready to send
    units: dict[int, dict] = {}  # unit id -> what to send, attempts, its chunk's input ref
    inflight: dict = {}  # object ref -> (unit id, actor)
    load = {id(a): 0 for a in pool}
    live = list(pool)
    computed = done = 0
    next_id = iter(range(1 << 62))

    def refill() -> bool:
        for c in source:
            for n, (mine, stored) in enumerate(_units(c.missing, c.keys, store)):
                u = next(next_id)
                args = (c.digests, c.chunk_id, c.keys, mine, plan, stored)
                if c.method == "run_encoded":
                    args = (c.data, n == 0, *args)
                else:
                    args = (c.data, *args)
                units[u] = {
                    "method": c.method,
                    "args": args,
                    "attempts": 0,
                    "images": c.images if n == 0 else [],
                }
                queue_.append(u)
            return True
        return False

    def submit() -> None:
        while live:
            actor = min(live, key=lambda a: load[id(a)])
            if load[id(actor)] >= IN_FLIGHT_PER_ACTOR:
                return
            if not queue_ and not refill():
                return
            u = queue_.popleft()
            units[u]["attempts"] += 1
            ref = getattr(actor, units[u]["method"]).remote(u, *units[u]["args"])
            inflight[ref] = (u, actor)
            load[id(actor)] += 1

    submit()
    while inflight:
        ready, _ = ray.wait(list(inflight), num_returns=1, timeout=timeout)
        if not ready:
            raise RuntimeFailure(f"no work unit finished within {timeout} s (unit_timeout_s)")
        ref = ready[0]
        u, actor = inflight.pop(ref)
        load[id(actor)] -= 1
        try:
            _, rows, images = ray.get(ref, timeout=timeout)
        except RayTaskError as e:  # the computation itself raised: deterministic, not retried
            cause = getattr(e, "cause", None)  # the worker's own exception (InputError, ImageError, ...)
            raise (cause if isinstance(cause, Exception) else e.as_instanceof_cause()) from None
        except (ActorDiedError, ActorUnavailableError, RayActorError, GetTimeoutError) as e:
            # Ray already restarted the actor and retried `retries` times: resubmit elsewhere
            if actor in live and isinstance(e, ActorDiedError):
                live.remove(actor)
            if units[u]["attempts"] > retries or not live:
                raise RuntimeFailure(f"work unit {u} failed {units[u]['attempts']} times: {e}") from e
            queue_.appendleft(u)
            submit()
            continue
        # the chunk's images before its rows, as the folder audit writes them
        for (digest, name, position), (picture, record) in zip(units[u]["images"], images):
            store.add_image(digest, model_sha, name, position, picture, record)
        for row in rows:
            computed += store.put(row)  # one transaction per row
        del units[u]  # and with the chunk's last unit, its input leaves the object store
        done += 1
        if progress:
            progress("units", done, total)
        submit()
    return computed


class _Echo:
    def ping(self) -> int:
        return 0


def round_trip_seconds(calls: int = 200, timeout_s: float = 120.0) -> float:
    """Ray's cost of one actor task on the connected cluster: a no-op call's round trip, the mean
    over ``calls`` submitted at once (the benchmark's per-task overhead)."""
    echo = ray.remote(num_cpus=0.1)(_Echo).remote()
    try:
        ray.get(echo.ping.remote(), timeout=timeout_s)  # the actor is up
        t0 = time.perf_counter()
        ray.get([echo.ping.remote() for _ in range(calls)], timeout=timeout_s)
        return (time.perf_counter() - t0) / calls
    finally:
        ray.kill(echo)
