"""javisrt.export."""
