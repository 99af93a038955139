"""javisrt.export: the DiT export contract, ONNX graphs (native / plugin flavours), FP8 Q/DQ via modelopt,
TensorRT rule checks and the ``javisrt export`` command.

- ``contract``   DiTContract: I/O names, dtypes, dynamic axes, TensorRT profiles, sample inputs, RoPE tables.
- ``module``     ExportableDiT: the model's own stages with RoPE tables as graph inputs, per graph flavour.
- ``op_sets``    the op sets of the graph flavours (onnx-native, onnx-plugin[-native-ffn], onnx-fp8).
- ``onnx``       dynamo export (opset 23) of the native/plugin flavours in fp32 or bf16.
- ``plugin_ops`` the ``javisrt::`` custom nodes and their ONNX Runtime (onnxruntime-extensions) references.
- ``quantize``   modelopt FP8 PTQ along sampling trajectories, Q/DQ export, fidelity metrics.
- ``fp8_rules``  static FP8 fusion-rule checker and TensorRT op audit.
- ``cli``        ``javisrt export``.
"""
