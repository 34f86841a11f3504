"""cptquant: sensitivity-guided mixed-precision ONNX export for Hugging Face transformers."""

from .api import analyze, export, verify  # light: each imports its machinery when called
from .version import __version__

__all__ = ["analyze", "export", "verify", "__version__"]
