"""javisrt.engine."""
