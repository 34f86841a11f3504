"""cptquant: sensitivity-guided mixed-precision ONNX export for Hugging Face transformers."""

__version__ = "0.1.0"

from .api import analyze, export, verify  # noqa: E402  (light: each imports its machinery when called)

__all__ = ["analyze", "export", "verify", "__version__"]
