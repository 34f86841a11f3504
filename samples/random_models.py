#!/usr/bin/env python
"""Recipe: models with seeded random weights, for latency, size and export benchmarks.

Random weights say nothing about accuracy (use samples/train_tiny_lm.py for that), but they have
the exact shapes, operator graph and file size of the real model, without a download.

  * `ensure_opt125m_random()`: OPT-125M shapes (12 layers, hidden 768, FFN 3072, 12 heads,
    vocabulary 50272, 2048 positions), seed 0, FP32 safetensors (~500 MB), no tokenizer (the
    real one is a 50k GPT-2 BPE that cannot be rebuilt offline; feed random ids below 50272).
    Cached in $CPTQ_CACHE_DIR/opt-125m-random-v1 (default ~/.cache/cptquant/opt-125m-random-v1).
  * `ensure_opt_random("opt-640m" | "opt-2.7b")`: larger OPT shapes for the scale benchmark
    (`make bench-large`): a 661 M-parameter decoder (OPT-1.3B's width, 11 layers; 2.64 GB FP32) and
    OPT-2.7B's exact shape (the paper's largest; 10.6 GB FP32), built the same way.
  * The tiny models of `cptquant.testing` (hidden 64, 2 layers), saved with tokenizers by `--tiny`.

    python samples/random_models.py [--out DIR] [--force] [--tiny DIR] [--shape opt-640m]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: use this checkout's cptquant, not an installed one
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cptquant.testing import EOS_ID, PAD_ID, TINY_BUILDERS, cache_root, save_tiny_model, seeded_model  # noqa: E402

OPT125M_NAME = "opt-125m-random-v1"
OPT125M_SEED = 0
# shape -> (hidden, FFN, layers, heads). "opt-640m" is OPT-1.3B's width at 11 layers: the 2.64 GB decoder the
# scale issue measured first; "opt-2.7b" is facebook/opt-2.7b's architecture.
OPT_SHAPES = {"opt-125m": (768, 3072, 12, 12), "opt-640m": (2048, 8192, 11, 32), "opt-2.7b": (2560, 10240, 32, 32)}


def _folder_name(shape: str) -> str:
    return OPT125M_NAME if shape == "opt-125m" else f"{shape}-random-v1"


def opt_config(shape: str = "opt-125m"):
    """An OPT architecture of OPT_SHAPES (written out rather than relying on OPTConfig defaults)."""
    from transformers import OPTConfig

    hidden, ffn, layers, heads = OPT_SHAPES[shape]
    return OPTConfig(
        vocab_size=50272, hidden_size=hidden, word_embed_proj_dim=hidden, ffn_dim=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=2048, do_layer_norm_before=True, activation_function="relu",
        dropout=0.0, attention_dropout=0.0, pad_token_id=PAD_ID, bos_token_id=EOS_ID, eos_token_id=EOS_ID,
        init_std=0.02, tie_word_embeddings=True,
    )


def opt125m_config():
    """facebook/opt-125m's architecture."""
    return opt_config("opt-125m")


def opt125m_random(seed: int = OPT125M_SEED):
    """In-memory OPTForCausalLM with OPT-125M shapes and seeded N(0, 0.02) weights, eval mode."""
    return opt_random("opt-125m", seed)


def opt_random(shape: str, seed: int = OPT125M_SEED):
    """In-memory OPTForCausalLM of an OPT_SHAPES shape with seeded N(0, 0.02) weights, eval mode."""
    from transformers import OPTForCausalLM

    config = opt_config(shape)
    return seeded_model(lambda: OPTForCausalLM(config), seed)


def _recipe_hash(seed: int, shape: str = "opt-125m") -> str:
    payload = {"name": _folder_name(shape), "seed": seed, "config": opt_config(shape).to_diff_dict()}
    payload["config"].pop("transformers_version", None)  # a library upgrade alone needs no rebuild
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def ensure_opt125m_random(out: str | Path | None = None, force: bool = False) -> Path:
    """Folder of the random-weight OPT-125M: `out`, else $CPTQ_CACHE_DIR/opt-125m-random-v1. Built
    (seconds; ~500 MB written) when missing, stale or `force`."""
    return ensure_opt_random("opt-125m", out, force)


def ensure_opt_random(shape: str, out: str | Path | None = None, force: bool = False) -> Path:
    """Folder of a random-weight OPT of OPT_SHAPES: `out`, else $CPTQ_CACHE_DIR/<shape>-random-v1 (OPT-125M:
    opt-125m-random-v1). Built when missing, stale or `force` (OPT-2.7B: ~11 GB of RAM and disk, minutes)."""
    import torch

    folder = Path(out) if out is not None else cache_root() / _folder_name(shape)
    expected = _recipe_hash(OPT125M_SEED, shape)
    try:
        current = json.loads((folder / "recipe.json").read_text()).get("recipe_hash") == expected
    except (OSError, ValueError):
        current = False
    if current and not force and (folder / "model.safetensors").is_file():
        return folder

    # Build beside the target and swap in, so an interrupted build never looks complete.
    staging = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model = opt_random(shape, OPT125M_SEED)
        model.save_pretrained(staging, safe_serialization=True)
        recipe = {
            "name": _folder_name(shape),
            "recipe_hash": expected,
            "seed": OPT125M_SEED,
            "parameters": sum(p.numel() for p in model.parameters()),
            "weights": "random, N(0, init_std) as initialised by transformers; not trained",
            "tokenizer": "none; use random ids in [0, 50272)",
            "torch": torch.__version__,
        }
        (staging / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def save_tiny_models(root: str | Path, seed: int = 0) -> dict[str, Path]:
    """Save every tiny test model (with its tokenizer) under root/<name>; returns the folders."""
    from cptquant.testing import tiny_bert

    root = Path(root)
    folders = {name: save_tiny_model(build(seed), root / f"tiny-{name}") for name, build in TINY_BUILDERS.items() if name != "bert"}
    for task in ("feature-extraction", "fill-mask", "text-classification"):
        folders[f"bert-{task}"] = save_tiny_model(tiny_bert(seed, task=task), root / f"tiny-bert-{task}")
    return folders


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help=f"OPT-125M folder (default: {cache_root() / OPT125M_NAME})")
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder is current")
    parser.add_argument("--tiny", type=Path, default=None, help="also save the tiny test models under this folder")
    parser.add_argument("--shape", choices=sorted(OPT_SHAPES), default="opt-125m", help="which OPT shape to build")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(ensure_opt_random(args.shape, args.out, force=args.force))
    if args.tiny is not None:
        for folder in save_tiny_models(args.tiny).values():
            print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
