"""The pipeline's sampling-loop choice and the device path (DenoiseSession.sample).

CPU: what decides the loop (choose_loop, the pipeline's and CLI's flags, the default CUDA-graph
setting) and the host path against the Python reference loop. GPU (``gpu``): the device loop --
``sample_cuda`` replaying the engine's captured CUDA graph of the whole CFG step, and the enqueue
fallback -- against the host loop on the same engine, progress and cancellation per step.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from _tolerance import assert_within, noise_floor

from javisrt.engine.config import JavisConfig
from javisrt.engine.errors import ConfigError, UnavailableError
from javisrt.engine.latents import draw_noise, latent_geometry
from javisrt.engine.model import random_model
from javisrt.export.contract import AUDIO, BATCH, VIDEO
from javisrt.runtime import sampling
from javisrt.runtime.backends import create_engine
from javisrt.runtime.cli import build_parser
from javisrt.runtime.denoise_session import DenoiseLoop, DenoiseSession, choose_loop
from javisrt.runtime.pipeline import default_cuda_graphs

GEOMETRY = latent_geometry(33, 32, 48)  # tiny: video [16, 9, 4, 6], audio [8, Tm4, 16]


def _request(device: str, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    cfg = JavisConfig.from_name("tiny")
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(2, cfg.text_len, cfg.text_dim, generator=g).to(device)
    video, audio = draw_noise(GEOMETRY, seed, device=device)
    assert video is not None and audio is not None
    return context, [video, audio]


def _session(engine: Any, context: torch.Tensor, noise: list[torch.Tensor]) -> DenoiseSession:
    return DenoiseSession(
        engine, context, {VIDEO: noise[0].shape[1:], AUDIO: noise[1].shape[1:]},
        video_frames=GEOMETRY.video_latent_frames,
    )  # fmt: skip


SAMPLERS = [
    sampling.SamplerConfig.rflow(32, 48, 33, 6, (5.0, 4.0)),
    sampling.SamplerConfig.wan_unipc(6, guidance=(5.0, 4.0)),
]


# ---- CPU: the choice ---------------------------------------------------------------------------


def _fake_engine(device: str) -> Any:
    return SimpleNamespace(name="fake", device=torch.device(device))


def test_choose_loop_on_cpu() -> None:
    eng = _fake_engine("cpu")
    assert choose_loop(eng) is DenoiseLoop.HOST
    assert choose_loop(eng, "host") is DenoiseLoop.HOST
    with pytest.raises(ConfigError, match="CUDA engine"):
        choose_loop(eng, "device")
    with pytest.raises(ConfigError, match="unknown sampling loop"):
        choose_loop(eng, "gpu")


def test_choose_loop_on_cuda(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A CUDA engine takes the device loop by default; without a CUDA-built loop, auto falls back to
    the host loop with a warning naming the reason, and an explicit ``device`` raises."""
    eng = _fake_engine("cuda")
    monkeypatch.setattr(sampling, "device_loop_error", lambda: "")
    assert choose_loop(eng) is DenoiseLoop.DEVICE
    assert choose_loop(eng, "device") is DenoiseLoop.DEVICE
    assert choose_loop(eng, "host") is DenoiseLoop.HOST
    monkeypatch.setattr(sampling, "device_loop_error", lambda: "built without nvcc")
    with caplog.at_level(logging.WARNING, logger="javisrt.runtime.denoise_session"):
        assert choose_loop(eng) is DenoiseLoop.HOST
    assert "built without nvcc" in caplog.text
    with pytest.raises(UnavailableError, match="built without nvcc"):
        choose_loop(eng, "device")


def test_device_loop_error_names_the_build() -> None:
    """On this machine the extension is either missing or CPU-only: the device loop says which."""
    reason = sampling.device_loop_error()
    ext = sampling._ext
    if ext is None:
        assert "not built" in reason
    elif not ext.cuda_compiled():
        assert "without nvcc" in reason
    else:
        assert reason == ""


def test_default_cuda_graphs() -> None:
    assert default_cuda_graphs("torch", "cuda") and default_cuda_graphs("tensorrt", "cuda:1")
    assert not default_cuda_graphs("torch", "cpu")
    assert not default_cuda_graphs("onnxruntime", "cuda")  # cannot capture


def test_cli_loop_flags() -> None:
    parser = build_parser()
    args = parser.parse_args(["generate", "--tiny", "--prompt", "x"])
    assert args.loop == "auto" and args.cuda_graphs is None
    args = parser.parse_args(["generate", "--tiny", "--prompt", "x", "--loop", "device", "--no-cuda-graphs"])
    assert args.loop == "device" and args.cuda_graphs is False
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--tiny", "--prompt", "x", "--loop", "gpu"])


@pytest.mark.parametrize("config", SAMPLERS, ids=["euler", "unipc"])
def test_host_path_equals_reference_loop(config: sampling.SamplerConfig) -> None:
    """On the CPU, DenoiseSession.sample runs the host loop: the same latents as the Python reference
    loop over the same engine (the C++ and Python loops share one fp32 operation order)."""
    model = random_model(JavisConfig.from_name("tiny"))
    context, noise = _request("cpu")
    engine = create_engine("torch", model=model)
    session = _session(engine, context, noise)
    steps: list[int] = []
    res = session.sample(noise, config, progress=lambda done, total, t, s: steps.append(done))
    ref = sampling.sample_ref([x.numpy() for x in noise], session.host_denoiser(), config)
    assert res.loop is DenoiseLoop.HOST and not res.graph and not res.cancelled
    assert res.steps_done == config.steps and steps == list(range(1, config.steps + 1))
    for out, want in zip(res.latents, ref.latents, strict=True):
        assert out.device.type == "cpu"
        if sampling.backend() == "cpp":
            assert torch.equal(out, torch.from_numpy(want))
        else:  # the reference loop itself
            assert np.array_equal(out.numpy(), want)
    with pytest.raises(ConfigError, match="CUDA engine"):
        session.sample(noise, config, loop="device")
    engine.unload()


def test_pipeline_rejects_unknown_loop() -> None:
    from javisrt.runtime.pipeline import JavisPipeline

    engine = create_engine("torch", model=random_model(JavisConfig.from_name("tiny")))
    text = SimpleNamespace(dim=engine.contract.config.text_dim, text_len=engine.contract.config.text_len)
    with pytest.raises(ConfigError, match="unknown sampling loop"):
        JavisPipeline(engine, text, None, None, loop="gpu")  # type: ignore[arg-type]
    assert JavisPipeline(engine, text, None, None).loop is DenoiseLoop.AUTO  # type: ignore[arg-type]
    engine.unload()


# ---- GPU: the device path ----------------------------------------------------------------------


def _loop_atol(ref: torch.Tensor, steps: int) -> float:
    """fp32 loop over ``steps`` steps on two devices: the DiT runs the same kernels (the same captured
    graph serves both paths), so the difference is the loop math's rounding, a few ulps per step."""
    return 4 * steps * noise_floor(ref) + 1e-7


@pytest.mark.gpu
@pytest.mark.parametrize("config", SAMPLERS, ids=["euler", "unipc"])
@pytest.mark.parametrize("graphs", [True, False], ids=["graph", "enqueue"])
def test_device_loop_equals_host_loop(config: sampling.SamplerConfig, graphs: bool) -> None:
    """sample_cuda over the engine's static device buffers -- replaying the captured CUDA graph of the
    whole CFG step, or enqueueing the engine each step where capture is off -- ends at the host loop's
    latents on the same engine and request."""
    model = random_model(JavisConfig.from_name("tiny"), device="cuda")
    context, noise = _request("cuda")
    engine = create_engine("torch", model=model, device="cuda", cuda_graphs=graphs)
    assert engine.supports_cuda_graphs is graphs
    session = _session(engine, context, noise)
    done: list[int] = []
    dev = session.sample(noise, config, progress=lambda d, total, t, s: done.append(d))
    assert dev.loop is DenoiseLoop.DEVICE and dev.graph is graphs and not dev.cancelled
    assert dev.steps_done == config.steps and len(dev.step_times_s) == config.steps
    assert done == list(range(1, config.steps + 1))
    assert all(x.device.type == "cuda" and x.dtype == torch.float32 for x in dev.latents)
    host = session.sample(noise, config, loop="host")
    assert host.loop is DenoiseLoop.HOST
    for name, d, h in zip((VIDEO, AUDIO), dev.latents, host.latents, strict=True):
        assert torch.isfinite(d).all()
        assert_within(d.cpu(), h, _loop_atol(h, config.steps), f"{name} (device vs host loop)")
    for x, x0 in zip(noise, _request("cuda")[1], strict=True):
        assert torch.equal(x, x0)  # the noise is not modified
    engine.unload()


@pytest.mark.gpu
def test_device_loop_captures_one_graph_per_bucket() -> None:
    """The binding hands sample_cuda a graph exec; a second request of the same bucket reuses it, and
    re-allocating another bucket invalidates the old binding."""
    model = random_model(JavisConfig.from_name("tiny"), device="cuda")
    context, noise = _request("cuda")
    engine = create_engine("torch", model=model, device="cuda", cuda_graphs=True)
    session = _session(engine, context, noise)
    b1 = session.loop_binding(use_graph=True)
    b2 = session.loop_binding(use_graph=True)
    assert b1.graph_exec != 0 and b1.graph_exec == b2.graph_exec
    kwargs = b1.sample_cuda_kwargs()
    assert kwargs["graph_exec"] == b1.graph_exec and kwargs["enqueue"] is None
    engine.allocate({**session.dims, BATCH: 4})
    with pytest.raises(ConfigError, match="released"):
        b1.sample_cuda_kwargs()
    engine.unload()


@pytest.mark.gpu
def test_device_loop_cancels_between_steps() -> None:
    model = random_model(JavisConfig.from_name("tiny"), device="cuda")
    context, noise = _request("cuda")
    engine = create_engine("torch", model=model, device="cuda", cuda_graphs=True)
    session = _session(engine, context, noise)
    polls = []

    def cancel() -> bool:
        polls.append(1)
        return len(polls) > 3

    res = session.sample(noise, SAMPLERS[0], cancel=cancel)
    assert res.cancelled and res.steps_done == 3 and len(res.step_times_s) == 3
    engine.unload()
