"""javisrt.runtime.backends: torch | onnxruntime | tensorrt behind one Engine interface."""
