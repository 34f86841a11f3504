"""ONNX files in and out, shared by the exporter, the runtimes and the bench (none of which it imports).

- onnx_export.py: the FP32 export of a loaded model (optimum-onnx, opset 21), loading and saving ONNX files
- baselines.py: the FP32/FP16 baselines beside an output folder and their cache fingerprint
- inputs.py: ONNX Runtime feeds for an exported transformer from the session's declared inputs
"""
