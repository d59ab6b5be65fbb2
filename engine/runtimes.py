"""The ONNX runtimes a Classifier can run on: onnxruntime (default; CPU or CUDA provider) and
OpenVINO (``runtime="openvino"``, its CPU plugin), a second, independent implementation of ONNX.

Both run the same graphs. onnxruntime gets the gradient model with its tuned rewrites
(``engine.compile.tuning``); every other runtime gets the portable graph that ``compile`` writes.
OpenVINO is asked for full float32 inference (``INFERENCE_PRECISION_HINT=f32``: on CPUs with
bf16 or AMX units it would otherwise compute in bf16), so both runtimes answer to float32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError

RUNTIMES = ("onnxruntime", "openvino")


def check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise InputError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    if runtime == "openvino":
        try:
            import openvino  # noqa: F401
        except ImportError:
            raise InputError("runtime 'openvino' needs the openvino package (pip install openvino)") from None
    return runtime


@dataclass
class _Port:
    name: str
    shape: list


class OpenVINOSession:
    """The slice of onnxruntime's InferenceSession interface the Classifier uses, on OpenVINO."""

    def __init__(self, model_bytes: bytes, threads: int | None = None):
        import openvino as ov

        from .compile.scratch import scratch_dir

        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        with scratch_dir("openvino-") as tmp:  # read_model takes ONNX from a file
            path = f"{tmp}/model.onnx"
            with open(path, "wb") as f:
                f.write(model_bytes)
            model = core.read_model(path)
            self._compiled = core.compile_model(model, "CPU", config)
        self._request = self._compiled.create_infer_request()
        self._inputs = [_Port(p.get_any_name(), _dims(p.get_partial_shape())) for p in model.inputs]
        self._outputs = {}
        for port in self._compiled.outputs:
            for name in port.get_names():
                self._outputs[name] = port

    def get_inputs(self) -> list[_Port]:
        return self._inputs

    def get_providers(self) -> list[str]:
        return ["OpenVINO:CPU"]

    def run(self, output_names: list[str] | None, feeds: dict) -> list[np.ndarray]:
        result = self._request.infer({k: np.ascontiguousarray(v) for k, v in feeds.items()})
        names = output_names or list(self._outputs)
        return [np.array(result[self._outputs[n]]) for n in names]


def _dims(shape) -> list:
    return [d.get_length() if d.is_static else None for d in shape]
