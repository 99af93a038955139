"""runtime/backends/tensorrt_engine.py without TensorRT or a GPU: the stream ordering of a run on a
caller's stream, the CUDA-graph capture failure message, and the refit-source check of a stripped plan.

The CUDA runtime is a recording stand-in with cuda-python's signatures (``cuda.bindings.runtime``:
``cudaEventRecord(event, stream)``, ``cudaStreamWaitEvent(stream, event, flags)``,
``cudaStreamEndCapture(stream) -> (err, graph)``, ...; checked against the installed cuda-python 13.4)
returning its real ``cudaError_t`` members, so ``cuda_call`` behaves as on a GPU machine.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest
from cuda.bindings import runtime as real_rt
from onnx import TensorProto, helper
from test_engine_meta import _meta

from javisrt.engine.config import JavisConfig
from javisrt.engine.errors import EngineMismatchError
from javisrt.export import engine_meta as em
from javisrt.export.contract import DiTContract
from javisrt.runtime.backends import tensorrt_engine
from javisrt.runtime.backends.tensorrt_engine import TensorRTEngine
from javisrt.runtime.engine import EngineState, ShapeBucket

OK = real_rt.cudaError_t.cudaSuccess
DIMS = {"batch": 2, "video_frames": 2, "video_height": 4, "video_width": 6, "audio_frames": 4}
ENGINE_STREAM, CALLER_STREAM = 111, 222


class FakeCudart:
    cudaError_t = real_rt.cudaError_t
    cudaStreamCaptureMode = real_rt.cudaStreamCaptureMode
    cudaEventDisableTiming = real_rt.cudaEventDisableTiming

    def __init__(self, calls: list[tuple[Any, ...]], end_capture: Any = OK) -> None:
        self.calls, self.end_capture = calls, end_capture

    def cudaEventRecord(self, event: Any, stream: int) -> tuple[Any]:
        self.calls.append(("record", event, stream))
        return (OK,)

    def cudaStreamWaitEvent(self, stream: int, event: Any, flags: int) -> tuple[Any]:
        self.calls.append(("wait", stream, event))
        return (OK,)

    def cudaGraphLaunch(self, exec_: Any, stream: int) -> tuple[Any]:
        self.calls.append(("graph", exec_, stream))
        return (OK,)

    def cudaStreamSynchronize(self, stream: int) -> tuple[Any]:
        return (OK,)

    def cudaStreamBeginCapture(self, stream: int, mode: Any) -> tuple[Any]:
        self.calls.append(("begin_capture", stream))
        return (OK,)

    def cudaStreamEndCapture(self, stream: int) -> tuple[Any, Any]:
        self.calls.append(("end_capture", stream))
        return (self.end_capture, "graph" if self.end_capture == OK else None)

    def cudaGraphDestroy(self, graph: Any) -> tuple[Any]:
        self.calls.append(("graph_destroy", graph))
        return (OK,)

    def cudaGraphInstantiate(self, graph: Any, flags: int) -> tuple[Any, Any]:
        return (OK, "exec")


class FakeContext:
    def __init__(self, calls: list[tuple[Any, ...]], capturable: bool = True) -> None:
        self.calls, self.capturable = calls, capturable

    def execute_async_v3(self, stream: int) -> bool:
        capturing = any(c[0] == "begin_capture" for c in self.calls) and not any(c[0] == "end_capture" for c in self.calls)
        self.calls.append(("execute", stream))
        return self.capturable or not capturing


@pytest.fixture
def contract() -> DiTContract:
    return DiTContract.for_config(JavisConfig.from_name("tiny"))


def _engine(tmp_path: Path, contract: DiTContract, monkeypatch: pytest.MonkeyPatch, capturable: bool = True,
            end_capture: Any = OK) -> tuple[TensorRTEngine, list[tuple[Any, ...]]]:  # fmt: skip
    """An engine in the ALLOCATED state over stand-ins (what load/allocate would have set up)."""
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(tensorrt_engine, "cudart", lambda: FakeCudart(calls, end_capture))
    eng = TensorRTEngine(em.write_engine(b"PLAN", _meta(contract), tmp_path / "e.plan"))
    eng._stream, eng._event, eng.context = ENGINE_STREAM, "event", FakeContext(calls, capturable)
    eng._bucket, eng._state = ShapeBucket.of(eng.contract, DIMS, 0), EngineState.ALLOCATED
    return eng, calls


def test_run_on_a_callers_stream_is_ordered_both_ways(tmp_path: Path, contract: DiTContract,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The input copies and profile switch are queued on the engine's stream: a run on the caller's
    stream first waits for them (event + cudaStreamWaitEvent), and the engine's stream then waits for the
    run before its output copies and next writes."""
    eng, calls = _engine(tmp_path, contract, monkeypatch)
    eng._run(None)
    assert calls == [("execute", ENGINE_STREAM)]  # own stream: already in order
    calls.clear()
    eng._run(CALLER_STREAM)
    assert calls == [
        ("record", "event", ENGINE_STREAM), ("wait", CALLER_STREAM, "event"),
        ("execute", CALLER_STREAM),
        ("record", "event", CALLER_STREAM), ("wait", ENGINE_STREAM, "event"),
    ]  # fmt: skip
    calls.clear()
    eng._graphs[eng._key()] = ("graph", "exec")
    eng._run(CALLER_STREAM)
    assert calls[:2] == [("record", "event", ENGINE_STREAM), ("wait", CALLER_STREAM, "event")]
    assert calls[2] == ("graph", "exec", CALLER_STREAM) and calls[3:] == [
        ("record", "event", CALLER_STREAM), ("wait", ENGINE_STREAM, "event")]  # fmt: skip


@pytest.mark.parametrize("capturable", [False, True])
def test_invalidated_capture_explains_itself(tmp_path: Path, contract: DiTContract, monkeypatch: pytest.MonkeyPatch,
                                             capturable: bool) -> None:  # fmt: skip
    """A capture TensorRT could not record (enqueue refused, or the capture invalidated) raises the
    helpful message, naming the CUDA error, instead of cuda_call's bare 'cudaStreamEndCapture failed'."""
    eng, calls = _engine(tmp_path, contract, monkeypatch, capturable=capturable,
                         end_capture=real_rt.cudaError_t.cudaErrorStreamCaptureInvalidated)  # fmt: skip
    with pytest.raises(RuntimeError, match=r"not capturable.*cudaErrorStreamCaptureInvalidated"):
        eng.capture_graph()
    assert ("end_capture", ENGINE_STREAM) in calls and not eng._graphs


def _onnx(path: Path, value: float) -> Path:
    w = helper.make_tensor("w", TensorProto.FLOAT, [1], [value])
    g = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [w])  # fmt: skip
    import onnx

    onnx.save(helper.make_model(g), str(path))
    return path


def test_stripped_plan_refits_only_from_its_own_onnx(tmp_path: Path, contract: DiTContract,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """kREFIT_IDENTICAL: the plan was optimised for the weights it was built with; refitting others is
    undefined behaviour. Load checks the recorded onnx_sha256 before TensorRT's refitter sees the file."""
    built = _onnx(tmp_path / "built.onnx", 1.0)
    other = _onnx(tmp_path / "other.onnx", 2.0)
    meta = _meta(contract, weights_stripped=True, checkpoint_sha256=None, onnx_sha256=em.onnx_sha256(built))
    plan = em.write_engine(b"PLAN", meta, tmp_path / "s.plan")
    refits: list[Path] = []

    class Runtime:
        def __init__(self, logger: Any) -> None:
            pass

        def deserialize_cuda_engine(self, data: bytes) -> Any:
            return types.SimpleNamespace(num_optimization_profiles=len(contract.profiles))

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="11.4.0.106", Runtime=Runtime))
    for name, fn in {"import_tensorrt": lambda: None, "make_logger": lambda: None,
                     "device_compute_capability": lambda device_id=0: (9, 0),
                     "check_engine_io": lambda engine, c: None,
                     "refit_engine_from_onnx": lambda engine, logger, path: refits.append(path)}.items():  # fmt: skip
        monkeypatch.setattr(tensorrt_engine, name, fn)
    with pytest.raises(EngineMismatchError, match="weight-stripped.*undefined behaviour"):
        TensorRTEngine(plan, refit_onnx=other)._deserialize()
    assert refits == []
    TensorRTEngine(plan, refit_onnx=built)._deserialize()
    assert refits == [built]
