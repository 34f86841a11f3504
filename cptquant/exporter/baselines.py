"""FP32 and FP16 baselines: the same optimum export, kept next to the output for comparisons.

The FP16 baseline converts the FP32 export with ONNX Runtime's float16 converter keeping FP32
inputs and outputs, so it takes the same feeds as every other variant.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .onnx_export import MODEL_FILE, load_onnx, save_onnx

CACHE_DIR_NAME = ".cptq-cache"


def baseline_dir(out_folder: Path, model_file: str = MODEL_FILE) -> Path:
    """Baselines live beside the output folder, not in it, so the output folder is what gets deployed.

    One cache per export: `folder/model.onnx` -> `.cptq-cache/folder`, `folder/NAME.onnx` ->
    `.cptq-cache/folder.NAME` (two exports in one folder may come from different models).
    """
    out_folder = out_folder.resolve()
    name = out_folder.name if model_file == MODEL_FILE else f"{out_folder.name}.{Path(model_file).stem}"
    return out_folder.parent / CACHE_DIR_NAME / name


def write_fp16(fp32_folder: Path, fp16_folder: Path) -> Path:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    fp16_folder.mkdir(parents=True, exist_ok=True)
    model = convert_float_to_float16(load_onnx(fp32_folder / MODEL_FILE), keep_io_types=True,
                                     disable_shape_infer=True)
    save_onnx(model, fp16_folder / MODEL_FILE)
    _copy_side_files(fp32_folder, fp16_folder)
    return fp16_folder / MODEL_FILE


def _copy_side_files(src: Path, dst: Path) -> None:
    """config.json, generation config and tokenizer: what ORTModelFor* needs beside model.onnx."""
    for path in src.iterdir():
        if path.is_file() and not path.name.startswith(MODEL_FILE):
            shutil.copy2(path, dst / path.name)


def side_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(MODEL_FILE))
