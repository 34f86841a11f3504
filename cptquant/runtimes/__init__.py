"""Runtime adapters: run exported models on ONNX Runtime execution providers and measure them."""
