"""The audit over a Ray cluster: an actor pool computes, the driver alone writes the store.

``audit_on_ray`` runs the same ``Plan`` as ``engine.audit.audit`` and fills the same SQLite store
with the same keys and the same bytes (each chunk is the same images in the same batch, so a
method that draws noise per chunk draws the same noise). The driver:

- loads the Classifier and compiles every gradient model the plan needs (``_needed_gradients``),
  then ships the model bytes and the gradient-model bytes to the actors through Ray's object
  store: compile once, explain anywhere; workers need no builder;
- computes which keys are missing, decodes only the chunks with work and ships the decoded
  inputs as arrays (workers need no access to the image files);
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

import os
import time
from collections import deque
from collections.abc import Callable, Sequence
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
        else:
            need.add(("gradient", None))
    return need


def _gradient_models(clf, plan: Plan) -> list[bytes]:
    """Compile (or take the given) gradient models for the plan, on the driver; their bytes."""
    from onnx import load_from_string

    from ..compile import CompiledInfo
    from ..compile.cache import cached_gradient_model
    from ..model import _builder_available

    builder = None
    for key in sorted(_needed_gradients(plan), key=str):
        if key in clf._compiled:
            continue
        if builder is None:
            builder = _builder_available()
        if not builder:
            rule, layer = key
            raise InputError(
                f"the plan needs the gradient model for rule {rule!r}"
                f"{' layer ' + layer if layer else ''}, which was not given, and no builder is "
                f"installed on the driver; compile it with `onnxplain compile MODEL --rule {rule}`"
            )
        data = cached_gradient_model(clf._mf, rule=key[0], layer=key[1])
        clf._compiled[key] = (data, CompiledInfo.from_model(load_from_string(data)))
    seen: dict[int, bytes] = {}
    for data, _ in clf._compiled.values():
        seen.setdefault(id(data), data)
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
        self, model: bytes, sha256: str, pin: bool, gradients: list[bytes], threads: int, batch_size: int
    ) -> None:
        from ..model import load

        # the driver's batch size: the runtime sees the same batches as a one-machine audit
        self.clf = load(model, threads=threads, batch_size=batch_size)
        if pin:
            self.clf._mf.sha256 = sha256
        elif self.clf.sha256 != sha256:
            raise InputError(f"the shipped model's sha256 {self.clf.sha256[:12]} is not {sha256[:12]}")
        for data in gradients:
            self.clf._add_gradient_model(data)

    def pid(self) -> int:
        return os.getpid()

    def providers(self) -> list[str]:
        return self.clf.providers

    def run(self, unit: int, x: np.ndarray, digests, chunk_id, keys, missing, plan, stored) -> tuple:
        from .run import compute_chunk

        rows: list[Row] = []
        compute_chunk(
            self.clf, x, digests, chunk_id, keys, missing, plan, lambda r: rows.append(r) or True, stored.get
        )
        return unit, rows


def audit_on_ray(
    clf_or_path: Any,
    paths: Sequence[str | Path],
    store: AuditStore,
    plan: Plan,
    *,
    address: str | None = None,
    workers: int = 2,
    cpus_per_worker: float = 0.5,
    gpus_per_worker: float | None = None,
    retries: int = 3,
    unit_timeout_s: float = 3600.0,
    progress: Progress | None = None,
    on_workers: Callable[[list], None] | None = None,
) -> Summary:
    """Run ``plan`` over the image files ``paths`` on a Ray cluster into ``store`` (on the driver).

    ``address``: None or "local" starts a local cluster on 127.0.0.1 for this call (and stops it);
    otherwise ``ray.init(address)`` ("auto", "ray://HOST:10001", "HOST:6379"). When Ray is
    already initialised in this process, that cluster is used and left running. ``workers``
    actors of ``cpus_per_worker`` CPUs each (on 2 CPUs keep it below 1 so Ray's own tasks can be
    scheduled); ``gpus_per_worker`` None: 1 when the cluster has a GPU per worker, else 0.
    ``retries``: Ray restarts of a dead actor and retries of its task, and then resubmissions of
    a unit to another actor. ``unit_timeout_s``: the longest wait for any result before giving up.
    ``on_workers``: called with the actor handles once they are up (monitoring, tests).
    Returns the same ``Summary`` as ``audit``; ``computed`` counts rows this driver committed.
    """
    from ..images import read_images
    from ..model import load
    from ..report.record import file_sha256, versions

    plan.validate()
    if workers < 1:
        raise InputError(f"workers must be >= 1, got {workers}")
    if not cpus_per_worker > 0:
        raise InputError(f"cpus_per_worker must be > 0, got {cpus_per_worker}")
    start = time.perf_counter()
    paths = [Path(p) for p in paths]
    if not paths:
        raise InputError("no image files given")
    clf = load(clf_or_path)
    digests = [file_sha256(p) for p in paths]
    model_sha = clf.sha256
    store.add_model(model_sha, str(clf.path or ""), _model_record(clf, versions()))
    methods = [(m, full_params("method", m, p), p) for m, p in plan.methods]
    metrics = [(m, full_params("metric", m, p), p) for m, p in plan.metrics]
    chunks = [list(range(i, min(i + plan.chunk, len(paths)))) for i in range(0, len(paths), plan.chunk)]
    # Which keys are missing, before any cluster is started: a finished audit starts nothing.
    todo, skipped = [], 0
    for rows in chunks:
        chunk_id = result_key(images=[digests[i] for i in rows])
        keys = _chunk_keys(model_sha, [digests[i] for i in rows], chunk_id, plan, methods, metrics)
        missing = {k for k in keys.all() if not store.has(k)}
        skipped += len(keys.all()) - len(missing)
        if missing:
            todo.append((rows, chunk_id, keys, missing))
    if not todo:
        return Summary(len(paths), len(chunks), 0, skipped, time.perf_counter() - start)
    gradients = _gradient_models(clf, plan)
    model, pin = _model_bytes(clf)

    started = None
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
        for what, each in (("CPU", cpus_per_worker), ("GPU", gpus_per_worker)):
            # actors that cannot all be placed would wait for resources without an error
            if each and workers * each > have.get(what, 0):
                raise InputError(
                    f"workers={workers} × {each} {what} each do not fit the cluster's "
                    f"{have.get(what, 0):g} {what}s; use fewer workers or a smaller share"
                )
        actor_cls = ray.remote(
            num_cpus=cpus_per_worker,
            num_gpus=gpus_per_worker,
            max_restarts=retries,
            max_task_retries=retries,
        )(AuditWorker)
        refs = (ray.put(model), ray.put(gradients))
        threads = max(1, int(cpus_per_worker))
        init = (refs[0], model_sha, pin, refs[1], threads, clf.batch_size)
        pool = [actor_cls.remote(*init) for _ in range(workers)]
        ray.get([a.pid.remote() for a in pool], timeout=unit_timeout_s)  # up, or its error now
        if on_workers:
            on_workers(list(pool))
        computed = _drive(
            pool, todo, paths, digests, clf, plan, store, read_images, retries, unit_timeout_s, progress
        )
    finally:
        if started:
            started()
    return Summary(len(paths), len(chunks), computed, skipped, time.perf_counter() - start)


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


def _drive(pool, todo, paths, digests, clf, plan, store, read_images, retries, timeout, progress) -> int:
    """Feed the actors unit by unit, decoding a chunk only when its first unit is due, and
    write every row as it comes back."""
    chunk_iter = iter(todo)
    queue: deque = deque()  # (unit id) ready to send
    units: dict[int, dict] = {}  # unit id -> what to send, attempts, its chunk's input ref
    inflight: dict = {}  # object ref -> (unit id, actor)
    load = {id(a): 0 for a in pool}
    live = list(pool)
    computed = done = 0
    next_id = iter(range(1 << 62))
    total = sum(len(_units(m, k, store, with_maps=False)) for _, _, k, m in todo)

    def refill() -> bool:
        for rows, chunk_id, keys, missing in chunk_iter:
            x, decoded = read_images([paths[i] for i in rows], clf.input_shape, clf.layout, clf.input_range)
            model_sha = clf.sha256
            for j, i in enumerate(rows):
                store.add_image(
                    digests[i], model_sha, str(paths[i]), i, _picture(clf, x[j]), decoded[j].to_dict()
                )
            x_ref = ray.put(x)
            for mine, stored in _units(missing, keys, store):
                u = next(next_id)
                units[u] = {
                    "args": (x_ref, [digests[i] for i in rows], chunk_id, keys, mine, plan, stored),
                    "attempts": 0,
                }
                queue.append(u)
            return True
        return False

    def submit() -> None:
        while live:
            actor = min(live, key=lambda a: load[id(a)])
            if load[id(actor)] >= IN_FLIGHT_PER_ACTOR:
                return
            if not queue and not refill():
                return
            u = queue.popleft()
            units[u]["attempts"] += 1
            ref = actor.run.remote(u, *units[u]["args"])
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
            _, rows = ray.get(ref, timeout=timeout)
        except RayTaskError as e:  # the computation itself raised: deterministic, not retried
            cause = getattr(e, "cause", None)  # the worker's own exception (InputError, ...)
            raise (cause if isinstance(cause, Exception) else e.as_instanceof_cause()) from None
        except (ActorDiedError, ActorUnavailableError, RayActorError, GetTimeoutError) as e:
            # Ray already restarted the actor and retried `retries` times: resubmit elsewhere
            if actor in live and isinstance(e, ActorDiedError):
                live.remove(actor)
            if units[u]["attempts"] > retries or not live:
                raise RuntimeFailure(f"work unit {u} failed {units[u]['attempts']} times: {e}") from e
            queue.appendleft(u)
            submit()
            continue
        for row in rows:
            computed += store.put(row)  # one transaction per row
        del units[u]  # and with the chunk's last unit, its input array leaves the object store
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
