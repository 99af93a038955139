"""javisrt.runtime."""
