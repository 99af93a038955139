"""JavisPipeline end to end on the tiny preset (random seeded components, CPU, the C++ loop when built).

Checks the MP4 against the request (streams, frame count, rate, A/V durations, read back with av),
seed reproducibility, the text cache, request validation, and loading every component from local
directories in the official layouts, which the test writes itself from the tiny components.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import save_file

from javisrt.engine.config import JavisConfig
from javisrt.engine.errors import CheckpointError, ConfigError
from javisrt.runtime import sampling
from javisrt.runtime.backends import create_engine
from javisrt.runtime.decode import VideoDecoder, load_wan_vae
from javisrt.runtime.demo import build_tiny_pipeline, seeded, tiny_dit
from javisrt.runtime.media import probe_mp4
from javisrt.runtime.pipeline import GenerationCancelled, GenerationConfig, GenerationResult, JavisPipeline

FPS = 16
PROMPT = "a bell rings twice in an empty church"
REQUEST = GenerationConfig(num_frames=33, height=32, width=32, steps=4, seed=42)


@pytest.fixture(scope="module")
def pipe() -> JavisPipeline:
    return build_tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def reference(pipe: JavisPipeline) -> GenerationResult:
    return pipe(PROMPT, REQUEST)


def test_result_and_mp4(reference: GenerationResult, tmp_path: Path) -> None:
    frames, wave = reference.frames, reference.waveform
    assert frames is not None and wave is not None
    assert frames.dtype == np.uint8 and frames.shape == (33, 32, 32, 3)
    assert wave.dtype == np.float32 and wave.shape == (33 * 1000,)  # int(F/16 * 16000)
    assert np.isfinite(wave).all() and frames.std() > 0
    path = reference.save(tmp_path / "out.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]
    info = probe_mp4(path, decode_frames=True, decode_audio=True)
    assert (info.video_streams, info.audio_streams) == (1, 1)
    assert info.num_frames == 33 and info.fps == FPS and (info.height, info.width) == (32, 32)
    assert info.sample_rate == 16000
    assert abs(info.audio_seconds - 33 / FPS) <= 1 / FPS  # audio lasts F/16 s within one video frame
    assert info.frames is not None and info.frames.shape == frames.shape


def test_seed_reproduces(pipe: JavisPipeline, reference: GenerationResult) -> None:
    calls = pipe.text_encoder.encoder_calls
    again = pipe(PROMPT, REQUEST)
    assert pipe.text_encoder.encoder_calls == calls  # prompt and negative prompt came from the cache
    assert np.array_equal(again.frames, reference.frames)
    assert np.array_equal(again.waveform, reference.waveform)
    other = pipe(PROMPT, REQUEST, seed=43)
    assert not np.array_equal(other.frames, reference.frames)
    assert not np.array_equal(other.waveform, reference.waveform)


def test_text_cache_skips_encoder(pipe: JavisPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = pipe.text_encoder.model.forward

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(pipe.text_encoder.model, "forward", counting)
    req = GenerationConfig(num_frames=33, height=16, width=16, steps=1, mode="t2v")
    pipe("a prompt seen for the first time", req)
    assert calls["n"] == 1
    pipe("a prompt seen for the first time", req)
    assert calls["n"] == 1


def test_progress_stages(pipe: JavisPipeline) -> None:
    seen: list[tuple[str, int, int]] = []
    pipe(PROMPT, GenerationConfig(num_frames=33, height=16, width=16, steps=3), progress=lambda *a: seen.append(a))
    assert [x for x in seen if x[0] == "denoise"] == [("denoise", i, 3) for i in range(4)]
    assert [x for x in seen if x[0] == "decode"] == [("decode", 0, 2), ("decode", 1, 2), ("decode", 2, 2)]
    assert seen[0] == ("text", 0, 1)


@pytest.mark.parametrize(("mode", "streams"), [("t2v", (1, 0)), ("t2a", (0, 1))])
def test_single_modality_modes(pipe: JavisPipeline, tmp_path: Path, mode: str, streams: tuple[int, int]) -> None:
    result = pipe(PROMPT, REQUEST, mode=mode)
    assert (result.frames is None) == (mode == "t2a")
    assert (result.waveform is None) == (mode == "t2v")
    info = probe_mp4(result.save(tmp_path / "x.mp4"))
    assert (info.video_streams, info.audio_streams) == streams


@pytest.mark.parametrize(
    ("prompt", "overrides", "match"),
    [
        (PROMPT, {"num_frames": 64}, "4n\\+1"),
        (PROMPT, {"num_frames": 35}, "4n\\+1"),
        (PROMPT, {"num_frames": 85}, "outside"),  # 5.3 s > 5 s
        (PROMPT, {"num_frames": 17}, "outside"),  # 1.06 s < 2 s
        (PROMPT, {"height": None, "width": None, "resolution": "999p"}, "unknown resolution"),
        (PROMPT, {"height": None, "width": None, "aspect_ratio": "7:3"}, "unknown aspect ratio"),
        (PROMPT, {"height": 32, "width": None}, "both height and width"),
        (PROMPT, {"mode": "t2x"}, "unknown mode"),
        (PROMPT, {"steps": 0}, "steps"),
        (PROMPT, {"guidance": (1.0, float("nan"))}, "guidance"),
        ("   ", {}, "prompt is empty"),
    ],
)
def test_bad_requests(pipe: JavisPipeline, prompt: str, overrides: dict, match: str) -> None:
    calls = pipe.text_encoder.encoder_calls
    with pytest.raises(ConfigError, match=match):
        pipe(prompt, REQUEST, **overrides)
    assert pipe.text_encoder.encoder_calls == calls  # rejected before any work


def _t2v_pipeline(pipe: JavisPipeline) -> JavisPipeline:
    engine = create_engine("torch", model=tiny_dit(0, JavisConfig.from_name("tiny", model_type="t2v")))
    return JavisPipeline(engine, pipe.text_encoder, pipe.video_decoder, None)


def test_mode_checkpoint_mismatch(pipe: JavisPipeline) -> None:
    t2v = _t2v_pipeline(pipe)
    with pytest.raises(ConfigError, match="t2av needs an audio branch.*t2v model"):
        t2v(PROMPT, REQUEST)
    with pytest.raises(ConfigError, match="t2a needs an audio branch"):
        t2v(PROMPT, REQUEST, mode="t2a")


def test_unknown_backend() -> None:
    with pytest.raises(ConfigError, match="unknown engine 'warp-drive'"):
        build_tiny_pipeline(backend="warp-drive")


@pytest.fixture(scope="module")
def tiny_onnx(pipe: JavisPipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from javisrt.export.contract import DiTContract
    from javisrt.export.onnx import export_dit, save

    model = pipe.engine.model  # type: ignore[attr-defined]
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    return save(export_dit(model, "native", "fp32", DiTContract.for_config(model.cfg)), path)


def test_compiled_engine_pipeline(tiny_onnx: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The onnxruntime engine drives the whole pipeline without an eager DiT (its config comes from the
    graph), and refuses a mode its graph was not exported for before any work."""
    import javisrt.runtime.demo as demo

    def no_eager_dit(*args: object, **kwargs: object) -> None:
        raise AssertionError("the compiled-engine pipeline built the eager DiT")

    monkeypatch.setattr(demo, "tiny_dit", no_eager_dit)
    ort_pipe = build_tiny_pipeline(backend="onnxruntime", engine_file=tiny_onnx)
    assert ort_pipe.engine.name == "onnxruntime" and ort_pipe.cfg.name == "tiny"
    result = ort_pipe(PROMPT, REQUEST)
    assert result.frames is not None and result.frames.shape == (33, 32, 32, 3) and result.waveform is not None
    calls = ort_pipe.text_encoder.encoder_calls
    with pytest.raises(ConfigError, match="exported for mode t2av; mode t2a runs on the torch engine"):
        ort_pipe(PROMPT, REQUEST, mode="t2a")
    assert ort_pipe.text_encoder.encoder_calls == calls


def test_solver_choice_reaches_the_loop(pipe: JavisPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """GenerationConfig.solver (and the model's default) is the solver the C++ loop is handed."""
    seen: list[sampling.SamplerConfig] = []
    real = sampling._ext

    class Spy:
        def sample(self, latents, denoiser, config, progress, cancel):  # type: ignore[no-untyped-def]
            seen.append(config)
            return real.sample(latents, denoiser, config, progress, cancel)

    assert real is not None, "the C++ sampler is not built"
    monkeypatch.setattr(sampling, "_ext", Spy())
    req = GenerationConfig(num_frames=33, height=16, width=16, steps=3, mode="t2v")
    euler = pipe(PROMPT, req)
    unipc = pipe(PROMPT, req, solver="unipc")
    wan = _t2v_pipeline(pipe)(PROMPT, req)
    assert [c.solver for c in seen] == [sampling.Solver.EULER, sampling.Solver.UNIPC, sampling.Solver.UNIPC]
    assert seen[1] == sampling.SamplerConfig.wan_unipc(3, guidance=(5.0,))  # Wan2.1's shift 5.0
    assert seen[0] == sampling.SamplerConfig.rflow(16, 16, 33, 3, (5.0,))
    assert (euler.solver, unipc.solver, wan.solver) == ("euler", "unipc", "unipc")
    assert not np.array_equal(euler.frames, unipc.frames)
    with pytest.raises(ConfigError, match="unknown solver"):
        GenerationConfig(solver="ddim")


def test_cancel(pipe: JavisPipeline) -> None:
    with pytest.raises(GenerationCancelled):
        pipe(PROMPT, REQUEST, cancel=lambda: True)


def test_guidance_per_modality() -> None:
    cfg = GenerationConfig(guidance=(4.0, 2.5))
    assert (cfg.video_guidance, cfg.audio_guidance) == (4.0, 2.5)
    assert GenerationConfig(guidance=6).guidance == (6.0, 6.0)
    assert GenerationConfig().size == (240, 426) and GenerationConfig(resolution="480p").size == (480, 854)


# ---- real-weight loading over directories in the official layouts ----------------------------------


def write_official_layout(pipe: JavisPipeline, root: Path) -> tuple[Path, Path, Path]:
    """The tiny components saved like the released files: JavisDiT++ model/ (sharded + index),
    Wan2.1-T2V-1.3B-Diffusers (vae/, text_encoder/, tokenizer/), AudioLDM2 (vae/, vocoder/)."""
    ckpt, wan, audioldm2 = root / "JavisDiT-v1.0-jav", root / "Wan2.1-T2V-1.3B-Diffusers", root / "audioldm2"
    (ckpt / "model").mkdir(parents=True)
    state = {k: v.contiguous() for k, v in pipe.engine.model.state_dict().items()}  # type: ignore[attr-defined]
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, str(ckpt / "model" / name))
        weight_map.update({k: name for k in names})
    (ckpt / "model" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    pipe.video_decoder.vae.save_pretrained(wan / "vae")
    pipe.text_encoder.model.save_pretrained(wan / "text_encoder")
    pipe.text_encoder.tokenizer.save_pretrained(wan / "tokenizer")
    pipe.audio_decoder.vae.save_pretrained(audioldm2 / "vae")
    pipe.audio_decoder.vocoder.save_pretrained(audioldm2 / "vocoder")
    return ckpt, wan, audioldm2


@pytest.fixture(scope="module")
def weight_dirs(pipe: JavisPipeline, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return write_official_layout(pipe, tmp_path_factory.mktemp("weights"))


def test_from_pretrained_reproduces(weight_dirs: tuple[Path, Path, Path], reference: GenerationResult) -> None:
    ckpt, wan, audioldm2 = weight_dirs
    loaded = JavisPipeline.from_pretrained(
        ckpt, wan, audioldm2, config="tiny", numerics="fp32", text_dtype=torch.float32
    )
    result = loaded(PROMPT, REQUEST)
    assert np.array_equal(result.frames, reference.frames)
    assert np.array_equal(result.waveform, reference.waveform)


def test_from_pretrained_missing_pieces(weight_dirs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    ckpt, wan, audioldm2 = weight_dirs
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        JavisPipeline.from_pretrained(tmp_path / "none", wan, audioldm2, config="tiny")
    with pytest.raises(CheckpointError, match="Wan2.1 directory not found"):
        JavisPipeline.from_pretrained(ckpt, tmp_path / "none", audioldm2, config="tiny")
    with pytest.raises(CheckpointError, match="AudioLDM2 directory"):
        JavisPipeline.from_pretrained(ckpt, wan, None, config="tiny", numerics="fp32")
    no_vocoder = tmp_path / "audioldm2"
    (no_vocoder / "vae").mkdir(parents=True)
    (no_vocoder / "vae" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="vocoder not found"):
        JavisPipeline.from_pretrained(ckpt, wan, no_vocoder, config="tiny", numerics="fp32")
    with pytest.raises(CheckpointError, match="not a Wan2.1 VAE"):
        load_wan_vae(_torch_save(tmp_path / "Wan2.1_VAE.pth", {"x": torch.zeros(1)}))


def _torch_save(path: Path, obj: object) -> Path:
    torch.save(obj, path)
    return path


_RESNET = [(".norm1.gamma", ".residual.0.gamma"), (".conv1.", ".residual.2."), (".norm2.gamma", ".residual.3.gamma"),
           (".conv2.", ".residual.6."), (".conv_shortcut.", ".shortcut.")]  # fmt: skip


def diffusers_vae_to_wan(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """AutoencoderKLWan keys back to Wan2.1's original VAE names (wan/modules/vae.py), written for
    this test from the module layouts: Encoder3d.downsamples / middle [res, attn, res] / head [norm,
    act, conv]; Decoder3d.upsamples = per stage 3 res blocks + 1 resample (flat index 4*stage + i)."""
    out = {}
    prefixes = {"quant_conv.": "conv1.", "post_quant_conv.": "conv2."}
    for key, value in state.items():
        new = key
        for a, b in prefixes.items():
            if key.startswith(a):
                new = b + key[len(a):]
        coder, _, rest = new.partition(".")
        if coder in ("encoder", "decoder"):
            if rest.startswith("conv_in."):
                rest = "conv1." + rest[len("conv_in."):]
            elif rest == "norm_out.gamma":
                rest = "head.0.gamma"
            elif rest.startswith("conv_out."):
                rest = "head.2." + rest[len("conv_out."):]
            elif rest.startswith("mid_block.attentions.0."):
                rest = "middle.1." + rest[len("mid_block.attentions.0."):]
            else:
                parts = rest.split(".")
                if parts[0] == "mid_block":  # resnets.{0,1} -> middle.{0,2}
                    head, tail = f"middle.{2 * int(parts[2])}", parts[3:]
                elif parts[0] == "down_blocks":
                    head, tail = f"downsamples.{parts[1]}", parts[2:]
                elif parts[0] == "up_blocks" and parts[2] == "resnets":
                    head, tail = f"upsamples.{4 * int(parts[1]) + int(parts[3])}", parts[4:]
                else:  # up_blocks.{b}.upsamplers.0
                    head, tail = f"upsamples.{4 * int(parts[1]) + 3}", parts[4:]
                rest = head + "." + ".".join(tail)
                if "resample" not in rest and "time_conv" not in rest:
                    for a, b in _RESNET:
                        rest = rest.replace(a, b)
            new = f"{coder}.{rest}"
        out[new] = value
    return out


def test_wan_original_vae_layout(tmp_path: Path) -> None:
    """Wan2.1's original Wan2.1_VAE.pth (a tiny one with the real block layout) decodes like diffusers'."""
    with seeded(5):
        vae = AutoencoderKLWan(base_dim=4, z_dim=16, num_res_blocks=2).eval()
    original = tmp_path / "Wan2.1-T2V-1.3B"
    original.mkdir()
    _torch_save(original / "Wan2.1_VAE.pth", diffusers_vae_to_wan(vae.state_dict()))
    loaded = VideoDecoder.from_pretrained(original)
    latent = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    assert np.array_equal(loaded.decode(latent), VideoDecoder(vae).decode(latent))
