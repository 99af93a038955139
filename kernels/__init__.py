"""javisrt.kernels."""
