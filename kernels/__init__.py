"""javisrt.kernels: Triton kernels for JavisDiT++ (one file per kernel, its PyTorch reference beside it).

- ``adaln_modulate``  LayerNorm (no affine) * (1 + scale) + shift, the attention input.
- ``rope_attention``  non-causal flash attention over [video; audio] with RoPE applied inside the kernel.
- ``modality_ffn``    the MS-MoE FFN: two experts in one grouped launch per GEMM, modulation prologue,
                      GELU-tanh / gate + residual epilogues; bf16/fp16/fp32 and FP8 e4m3 variants.
- ``ops_triton``      ``TritonOps``, the "triton" implementation of the ``engine/ops.py`` seam.
- ``aot``             Triton -> sm_90a PTX/cubin compile and launch math (no tensorrt import).
"""

from __future__ import annotations


def is_interpreted(kernel: object) -> bool:
    """True when ``kernel`` was decorated while ``TRITON_INTERPRET=1`` (it runs on CPU tensors).

    The launchers need this because the interpreter stores bf16 as raw integer bits: ``tl.dot`` on bf16
    tiles is wrong there (feasibility.md §2), so bf16 dots are upcast to fp32 under the interpreter only.
    """
    return type(kernel).__name__ == "InterpretedFunction"
