"""javisrt — a compiled inference engine for JavisDiT++ (joint text-to-audio+video diffusion).

Subpackages (one per top-level folder of the repository):
  javisrt.engine   the network: config, reference model, checkpoints, op dispatch
  javisrt.kernels  Triton kernels (fused TA-RoPE attention, per-modality FFN, modulation)
  javisrt.export   ONNX export contracts, FP8 quantization, TensorRT engine build
  javisrt.runtime  pipeline, sampling loop (Python reference), backends, CLI
  javisrt.bench    trtexec-style benchmarks
The C++ sampling loop is the private extension ``javisrt._sampler``.
"""

__version__ = "0.1.0"
