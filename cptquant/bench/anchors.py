"""The variants a user can make today without cptquant, built the way a user would build them."""

from __future__ import annotations

from pathlib import Path

import onnx

from ..model_loading import LoadedModel
from ..onnx_io.baselines import write_fp16
from ..onnx_io.onnx_export import MODEL_FILE, export_onnx, save_onnx

FP32, FP16, ORT_INT8, ORT_INT4 = "FP32", "FP16", "ORT int8 dynamic", "ORT int4 RTN"


def ort_int8_dynamic(fp32: Path, out: Path) -> None:
    """ORT's `quantize_dynamic` int8 per channel, as its docs advise: `reduce_range` (7-bit weights) on a CPU whose
    int8 GEMM saturates full-range weights (AVX2 without VNNI), where its products are wrong otherwise."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from ..runtimes.cpu import u8s8_gemm_saturates

    out.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(fp32, out, weight_type=QuantType.QInt8, per_channel=True, reduce_range=u8s8_gemm_saturates())


def build_anchors(loaded: LoadedModel, root: Path) -> dict[str, Path]:
    """FP32 and FP16 ONNX; ORT `quantize_dynamic` int8 per-channel; ORT `MatMulNBitsQuantizer` int4, block 32."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    fp32 = root / "fp32"
    export_onnx(loaded, fp32)
    write_fp16(fp32, root / "fp16")
    int8 = root / "ort-int8-dynamic" / MODEL_FILE
    ort_int8_dynamic(fp32 / MODEL_FILE, int8)
    int4 = root / "ort-int4-rtn" / MODEL_FILE
    quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32 / MODEL_FILE)), block_size=32, is_symmetric=True)
    quantizer.process()
    save_onnx(quantizer.model.model, int4)
    return {FP32: fp32 / MODEL_FILE, FP16: root / "fp16" / MODEL_FILE, ORT_INT8: int8, ORT_INT4: int4}
