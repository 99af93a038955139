"""runtime/export_cli.py: ``javisrt export`` end to end on a tiny checkpoint (graph + manifest)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from javisrt.engine.checkpoint import save_model
from javisrt.engine.config import JavisConfig
from javisrt.engine.errors import ConfigError
from javisrt.engine.model import build_model, init_weights
from javisrt.runtime import export_cli as cli
from javisrt.export.contract import DiTContract
from javisrt.export.onnx import contract_of


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = init_weights(build_model(JavisConfig.from_name("tiny")), torch.Generator().manual_seed(0))
    return save_model(model, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="javisrt")
    cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["export", *argv])


def test_cli_bf16_plugin(checkpoint: Path, tmp_path: Path) -> None:
    args = parse(["--checkpoint", str(checkpoint), "--precision", "bf16", "--flavor", "plugin", "--out", str(tmp_path)])
    assert cli.run(args) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["files"] == ["dit.onnx"] and manifest["checks"] == {"op_audit": []}
    assert manifest["checkpoint"]["hash"] == cli.checkpoint_hash(checkpoint) and manifest["checkpoint"]["hash"].startswith("sha256:")
    assert manifest["versions"]["torch"].startswith("2.13")
    contract = DiTContract.from_dict(manifest["contract"])
    graph = onnx.load(str(tmp_path / "dit.onnx"))
    assert contract_of(graph) == contract
    assert any(n.domain == "javisrt" for n in graph.graph.node)
    # the engine builder reads the checkpoint hash from the graph (export/trt_build.read_artifact)
    from javisrt.export.trt_build import read_artifact

    assert read_artifact(tmp_path / "dit.onnx").checkpoint_sha256 == manifest["checkpoint"]["hash"]


@pytest.mark.filterwarnings("ignore:`torch.jit.script:DeprecationWarning")  # modelopt 0.47 on torch 2.13
def test_cli_fp8(checkpoint: Path, tmp_path: Path) -> None:
    args = parse([
        "--checkpoint", str(checkpoint), "--precision", "fp8", "--out", str(tmp_path),
        "--calib-shape", "33,48,64", "--calib-steps", "3", "--calib-num-prompts", "2", "--fp32-copy",
    ])  # fmt: skip
    assert cli.run(args) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["checks"] == {"fp8_rules": [], "op_audit": []}
    assert manifest["files"] == ["dit.onnx", "dit.fp32.onnx"]
    graph = onnx.load(str(tmp_path / "dit.onnx"))
    onnx.checker.check_model(graph, full_check=True)
    assert sum(n.op_type == "QuantizeLinear" for n in graph.graph.node) > 0
    # FP8 on BF16: every weight DequantizeLinear outputs bf16 (its scale's dtype), the embedders stay
    # unquantized (no DQ feeds a Conv)
    inits = {i.name: i for i in graph.graph.initializer}
    weight_dqs = [n for n in graph.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert weight_dqs and all(inits[n.input[1]].data_type == onnx.TensorProto.BFLOAT16 for n in weight_dqs)
    producers = {o: n for n in graph.graph.node for o in n.output}
    convs = [n for n in graph.graph.node if n.op_type == "Conv"]
    assert convs and not any(producers.get(n.input[1]) is not None and producers[n.input[1]].op_type == "DequantizeLinear"
                             for n in convs)
    # the fp32 copy is the graph ONNX Runtime checks on CPU
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # FP8 Q/DQ: feasibility §3
    session = ort.InferenceSession(str(tmp_path / "dit.fp32.onnx"), so, providers=["CPUExecutionProvider"])
    contract = DiTContract.from_dict(manifest["contract"])
    dims = {"batch": 2, "video_frames": 3, "video_height": 6, "video_width": 8, "audio_frames": 10}
    inputs = contract.sample_inputs(dims, torch.Generator().manual_seed(0))
    outs = session.run(contract.output_names, {k: v.numpy() for k, v in inputs.items()})
    assert all(o.shape == contract.output_shapes(dims)[n] for o, n in zip(outs, contract.output_names))
    assert all(np.isfinite(o).all() for o in outs)


def test_cli_rejects_fp8_plugin(checkpoint: Path, tmp_path: Path) -> None:
    args = parse(["--checkpoint", str(checkpoint), "--precision", "fp8", "--flavor", "plugin", "--out", str(tmp_path)])
    with pytest.raises(ConfigError):
        cli.run(args)
