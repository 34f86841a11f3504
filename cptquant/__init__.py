"""cptquant: sensitivity-guided mixed-precision ONNX export for Hugging Face transformers."""

__version__ = "0.1.0"
