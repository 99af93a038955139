"""javisrt.bench."""
