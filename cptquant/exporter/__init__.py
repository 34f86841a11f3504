"""From a torch model and a plan to a mixed-precision ONNX folder."""
