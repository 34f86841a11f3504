"""cptquant: sensitivity-guided mixed-precision ONNX export for Hugging Face transformers."""

from .version import __version__
from .api import analyze, export, verify  # light: each imports its machinery when called

__all__ = ["analyze", "export", "verify", "__version__"]
