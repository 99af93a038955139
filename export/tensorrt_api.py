"""The TensorRT and CUDA runtime calls shared by the engine builder (``export/trt_build.py``) and the
TensorRT engine (``runtime/backends/tensorrt_engine.py``).

Thin by design: TensorRT cannot be installed on the dev/CI machines, so ``tensorrt`` is imported lazily
inside functions (:func:`import_tensorrt` says why it is missing); CUDA calls go through cuda-python
(``cuda.bindings.runtime``). Living in ``export/`` keeps imports one way (engine <- export <- runtime).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from javisrt.engine.errors import EngineMismatchError, UnavailableError

if TYPE_CHECKING:  # the stubs (tensorrt-stubs) type every TensorRT call below for mypy
    import tensorrt as trt

log = logging.getLogger(__name__)


def import_tensorrt() -> Any:
    """``tensorrt``, or UnavailableError saying why (not installed / not the real package)."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise UnavailableError(
            f"TensorRT is not installed ({exc}); the tensorrt backend and `javisrt build` need a GPU machine "
            "with TensorRT 11 (pip `tensorrt` from NVIDIA's index)"
        ) from exc
    if not hasattr(trt, "Runtime"):
        raise UnavailableError(
            "`import tensorrt` found a package without TensorRT's bindings (an empty namespace package, e.g. left "
            "by tensorrt-stubs installed into site-packages); install TensorRT 11"
        )
    return trt


def cudart() -> Any:
    from cuda.bindings import runtime

    return runtime


def cuda_call(result: Any, what: str) -> Any:
    """Unwrap a cuda-python ``(err, *values)`` result; raise with the CUDA error name otherwise."""
    rt = cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != rt.cudaError_t.cudaSuccess:
        if err in (rt.cudaError_t.cudaErrorNoDevice, rt.cudaError_t.cudaErrorInsufficientDriver):
            raise UnavailableError(f"{what}: no usable CUDA device/driver ({err.name})")
        raise RuntimeError(f"{what} failed: {err.name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def device_compute_capability(device_id: int = 0) -> tuple[int, int]:
    rt = cudart()
    major = cuda_call(rt.cudaDeviceGetAttribute(rt.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor, device_id), "cc")
    minor = cuda_call(rt.cudaDeviceGetAttribute(rt.cudaDeviceAttr.cudaDevAttrComputeCapabilityMinor, device_id), "cc")
    return int(major), int(minor)


def make_logger() -> trt.ILogger:
    """A ``trt.ILogger`` forwarding to :mod:`logging` (TensorRT severities -> logging levels)."""
    import_tensorrt()
    import tensorrt as trt

    levels = {
        trt.ILogger.Severity.INTERNAL_ERROR: logging.CRITICAL,
        trt.ILogger.Severity.ERROR: logging.ERROR,
        trt.ILogger.Severity.WARNING: logging.WARNING,
        trt.ILogger.Severity.INFO: logging.INFO,
        trt.ILogger.Severity.VERBOSE: logging.DEBUG,
    }

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            logging.getLogger("tensorrt").log(levels.get(severity, logging.INFO), "%s", msg)

    return _Logger()


def refit_engine_from_onnx(engine: trt.ICudaEngine, logger: trt.ILogger, onnx_path: Path) -> None:
    """Refit every refittable weight of ``engine`` from the initializers of ``onnx_path``."""
    import tensorrt as trt

    refitter = trt.Refitter(engine, logger)
    parser_refitter = trt.OnnxParserRefitter(refitter, logger)
    if not parser_refitter.refit_from_file(str(onnx_path)):
        errors = [str(parser_refitter.get_error(i)) for i in range(parser_refitter.num_errors)]
        raise EngineMismatchError(f"refit from {onnx_path} failed: {errors}")
    missing = refitter.get_missing_weights()
    if missing:
        raise EngineMismatchError(f"refit from {onnx_path}: weights still missing: {missing[:8]}")
    if not refitter.refit_cuda_engine():
        raise EngineMismatchError(f"refit_cuda_engine failed for {onnx_path} (see the TensorRT log)")
    log.info("refitted the engine from %s", onnx_path)
