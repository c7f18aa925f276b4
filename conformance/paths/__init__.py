"""Optimized paths with loading or running of their own: torch.compile, ONNX Runtime through Optimum."""
