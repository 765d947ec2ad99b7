"""Train or import a BERT classifier or a GPT generator in PyTorch, export it to verified ONNX, and write a
model repository (see docs/model-repository.md). The command line is `python -m export`."""

from export.errors import ExportError

__all__ = ["ExportError"]
