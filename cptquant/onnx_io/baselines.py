"""FP32 and FP16 baselines: the same optimum export, kept next to the output for comparisons.

The FP16 baseline converts the FP32 export with ONNX Runtime's float16 converter keeping FP32
inputs and outputs, so it takes the same feeds as every other variant.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from ..output_folder import CACHE_DIR_NAME
from .external_data import has_external_data
from .float16 import convert_streamed
from .onnx_export import MODEL_FILE, SEQ2SEQ_FILES, is_onnx_file, load_onnx, save_onnx

if TYPE_CHECKING:
    from ..model_loading import LoadedModel

FINGERPRINT_FILE = "fingerprint.json"


def baseline_dir(out_folder: Path, model_file: str = MODEL_FILE) -> Path:
    """Baselines live beside the output folder, not in it, so the output folder is what gets deployed.

    One cache per export, keyed by a hash of the model file's resolved path (names alone collide:
    `a/b.onnx` and `a.b/model.onnx`), readable by its prefix: `.cptq-cache/folder-<hash>`,
    `.cptq-cache/folder.NAME-<hash>`.
    """
    out_folder = out_folder.resolve()
    name = out_folder.name if model_file == MODEL_FILE else f"{out_folder.name}.{Path(model_file).stem}"
    key = hashlib.sha256(str(out_folder / model_file).encode()).hexdigest()[:16]
    return out_folder.parent / CACHE_DIR_NAME / f"{name}-{key}"


def legacy_baseline_dir(out_folder: Path, model_file: str = MODEL_FILE) -> Path:
    """Where cptquant kept an export's baselines before the path-keyed names above: `.cptq-cache/folder`,
    `.cptq-cache/folder.NAME` (the names `a/b.onnx` and `a.b/model.onnx` shared). Nothing reads them now."""
    out_folder = out_folder.resolve()
    name = out_folder.name if model_file == MODEL_FILE else f"{out_folder.name}.{Path(model_file).stem}"
    return out_folder.parent / CACHE_DIR_NAME / name


def remove_legacy_baselines(out_folder: Path, model_file: str = MODEL_FILE) -> Path | None:
    """Remove this export's cache of the old naming (an FP32/FP16 copy of the model, often hundreds of MB, that
    no run would otherwise ever delete); returns it when removed. Only a real folder holding baselines goes:
    a link (to it, or a `.cptq-cache` that is one) is not followed, and a name of today's form (`NAME-<16 hex>`)
    is a current cache, never legacy."""
    old = legacy_baseline_dir(out_folder, model_file)
    if (old.is_symlink() or old.parent.is_symlink() or not old.is_dir() or re.fullmatch(r".+-[0-9a-f]{16}", old.name)
            or not any((old / variant).is_dir() for variant in ("fp32", "fp16"))):
        return None
    shutil.rmtree(old, ignore_errors=True)
    return old


def baseline_fingerprint(loaded: LoadedModel) -> str:
    """What the FP32 baseline is made of: the source weights (every tensor of the state dict, bytes and
    shape) and the export settings (task, opset). Recorded in the report and in the cache, so a cache
    (or a --source) that is not this export's model is recognised by content, not by file names."""
    import torch

    from .onnx_export import OPSET

    digest = hashlib.sha256(json.dumps({"task": loaded.task, "opset": OPSET,
                                        "model_type": getattr(loaded.config, "model_type", None)}).encode())
    for name, tensor in sorted(loaded.model.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        if data.numel():
            digest.update(data.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, not a copy
    return digest.hexdigest()


def write_fingerprint(cache: Path, fingerprint: str) -> None:
    (cache / FINGERPRINT_FILE).write_text(json.dumps({"fingerprint": fingerprint}) + "\n")


def read_fingerprint(cache: Path) -> str | None:
    try:
        value = json.loads((cache / FINGERPRINT_FILE).read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def write_fp16(fp32_folder: Path, fp16_folder: Path) -> Path:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    fp16_folder.mkdir(parents=True, exist_ok=True)
    names = [name for name in SEQ2SEQ_FILES if (fp32_folder / name).is_file()] or [MODEL_FILE]  # a seq2seq export
    for name in names:  # has several files, each converted alike
        if has_external_data(fp32_folder / name):  # weights over 2 GB: one weight in memory at a time
            convert_streamed(fp32_folder / name, fp16_folder / name)
            continue
        model = convert_float_to_float16(load_onnx(fp32_folder / name), keep_io_types=True,
                                         disable_shape_infer=True)
        save_onnx(model, fp16_folder / name)
        del model
    _copy_side_files(fp32_folder, fp16_folder)
    return fp16_folder / names[0]


def _copy_side_files(src: Path, dst: Path) -> None:
    """config.json, generation config and tokenizer: what ORTModelFor* needs beside model.onnx."""
    for path in src.iterdir():
        if path.is_file() and not is_onnx_file(path.name):
            shutil.copy2(path, dst / path.name)


def side_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not is_onnx_file(p.name))
