"""Runs inside the builder interpreter (onnxruntime-training-cpu 1.19.2), never in the main one.

The only file of onnxplain that imports onnxruntime-training. It talks JSON over stdin/stdout:

  {"op": "build", "model": IN, "output": OUT, "loss": NAME, "wrt": [NAMES], "gradients": {OP: DEF}}
  {"op": "run", "model": PATH, "feeds": NPZ, "outputs": [NAMES], "result": NPZ, "repeat": N}
  {"op": "version"}

It must stay importable with nothing but that onnxruntime and numpy: no onnx, no onnxplain.
"""

import json
import sys
import time
import traceback


def _register_gradients(C, definitions):
    """Register the gradient definitions of the backward rule before the build: {forward op:
    [(op_type, inputs, outputs, attributes)]}, built in ``engine/compile/rules.py`` (the table of
    backward rules; it covers ReLU6 through Clip without pattern matching)."""
    for forward_op, spec in definitions.items():
        nds = []
        for op_type, inputs, outputs, attrs in spec:
            nd = C.GradientNodeDefinition()
            nd.op_type, nd.domain, nd.inputs, nd.outputs = op_type, "", inputs, outputs
            ads = []
            for key, value in (attrs or {}).items():
                ad = C.GradientNodeAttributeDefinition()
                ad.name, ad.value_json = key, json.dumps(value["value"])
                ad.dtype, ad.is_tensor = value["dtype"], value.get("is_tensor", False)
                ads.append(ad)
            nd.attributes = ads
            nds.append(nd)
        C.register_gradient_definition("::" + forward_op, nds)


def build(req):
    from onnxruntime.capi import _pybind_state as C

    _register_gradients(C, req["gradients"])
    import unary_gradients  # sibling file (this script's folder is on sys.path): Atan, Floor, ... gradients

    unary_gradients.register(C)
    with open(req["model"], "rb") as f:
        data = f.read()
    builder = C.GradientGraphBuilder(data, {req["loss"]}, set(req["wrt"]), req["loss"])
    builder.build()
    builder.save(req["output"])
    return {"ok": True}


def run(req):
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = int(req.get("threads", 1))
    sess = ort.InferenceSession(req["model"], so, providers=["CPUExecutionProvider"])
    feeds = dict(np.load(req["feeds"]))
    outs = sess.run(req["outputs"], feeds)
    seconds = []
    for _ in range(int(req.get("repeat", 0))):  # timing runs, for the benchmarks
        start = time.perf_counter()
        sess.run(req["outputs"], feeds)
        seconds.append(time.perf_counter() - start)
    if req.get("result"):
        np.savez(req["result"], **dict(zip(req["outputs"], outs)))
    return {"ok": True, "seconds": seconds}


def version(_req):
    import onnxruntime as ort
    from onnxruntime.capi._pybind_state import GradientGraphBuilder  # noqa: F401  (training build only)

    return {"ok": True, "onnxruntime": ort.__version__}


def main():
    req = json.loads(sys.stdin.read())
    try:
        result = {"build": build, "run": run, "version": version}[req["op"]](req)
    except Exception as e:  # report, never crash silently: the caller turns this into a clear error
        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
    sys.stdout.write(json.dumps(result))


if __name__ == "__main__":
    main()
