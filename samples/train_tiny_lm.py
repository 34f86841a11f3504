#!/usr/bin/env python
"""Recipe: a small OPT causal language model trained offline, for measuring quantization damage.

Random weights make every quantizer look equally good; a model that has actually learned text has
a perplexity that quantization can visibly hurt. This trains one on CPU in about 10 minutes:
OPT architecture (4 layers, hidden 256, FFN 1024, 4 heads, 256 positions, tied embeddings), a
byte-level BPE tokenizer (4096 tokens) trained with `tokenizers`, and the offline documents of
`cptquant.corpus` (train split only; evaluation split held out, calibration split untouched).

The result is cached outside git, in $CPTQ_CACHE_DIR/tiny-opt-lm-v1 (default
~/.cache/cptquant/tiny-opt-lm-v1), and rebuilt when missing or when the recipe or corpus changes.

    python samples/train_tiny_lm.py [--out DIR] [--force]

From code: `cptquant.testing.ensure_tiny_lm()` or this module's `ensure_tiny_lm()`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: use this checkout's cptquant, not an installed one
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cptquant.corpus import corpus_hash, lm_splits  # noqa: E402
from cptquant.testing import EOS_ID, PAD_ID, cache_root, train_byte_bpe  # noqa: E402

RECIPE_NAME = "tiny-opt-lm-v1"


@dataclasses.dataclass(frozen=True)
class Recipe:
    vocab_size: int = 4096  # the corpus is ~0.5M tokens: a larger vocabulary would leave rare rows untrained
    hidden_size: int = 256
    ffn_dim: int = 1024
    num_layers: int = 4
    num_heads: int = 4
    max_positions: int = 256
    seq_len: int = 256  # = max_positions, so every position embedding is trained
    batch_size: int = 8
    steps: int = 1100  # ~5 passes over the train split; ~8 minutes on 2 free cores
    warmup_steps: int = 100
    peak_lr: float = 1e-3
    final_lr_ratio: float = 0.1  # cosine decays to peak_lr * final_lr_ratio
    weight_decay: float = 0.1
    beta2: float = 0.95
    grad_clip: float = 1.0
    dropout: float = 0.1  # several epochs over little data: some regularisation
    eval_every: int = 250  # 0: evaluate only at the end
    log_every: int = 50
    seed: int = 0
    threads: int = 2  # fixed, because CPU reduction order (and so the bits) depends on it
    # The CPU kernels this model uses are deterministic for a fixed thread count (the tests check
    # two runs are bit-identical); torch's checked deterministic mode measured ~1.5x slower here.
    deterministic_algorithms: bool = False
    max_docs: int = 0  # > 0: only the first max_docs documents of each split (micro recipe)


RECIPE = Recipe()
# Seconds, for tests: runs every code path of the full recipe on a few documents.
MICRO_RECIPE = Recipe(
    vocab_size=384, hidden_size=64, ffn_dim=128, num_layers=2, num_heads=2, max_positions=64, seq_len=64,
    batch_size=4, steps=3, warmup_steps=1, eval_every=0, log_every=1, max_docs=12,
    threads=1,  # ops this small gain nothing from threads, and lose a lot when cores are shared
)


def recipe_hash(recipe: Recipe = RECIPE) -> str:
    """Identifies what a trained folder was built from: recipe, corpus text, and this file's name."""
    payload = {"name": RECIPE_NAME, "recipe": dataclasses.asdict(recipe), "corpus_sha256": corpus_hash()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def default_dir() -> Path:
    return cache_root() / RECIPE_NAME


def _lr_factor(step: int, recipe: Recipe) -> float:
    """Linear warmup, then cosine decay to final_lr_ratio (step counts from 0)."""
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return recipe.final_lr_ratio + (1.0 - recipe.final_lr_ratio) * cosine


def _token_stream(tokenizer, docs: list[str]):
    """All documents as one id stream; each starts with OPT's BOS (</s>), as at inference."""
    import torch

    # The backend tokenizer directly: documents are longer than model_max_length by design, and
    # the wrapper would warn about each one.
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer.backend_tokenizer.encode(doc).ids)
    return torch.tensor(ids, dtype=torch.long)


def _windows(stream, seq_len: int, limit: int = 0):
    """Non-overlapping windows covering the stream (last one shorter); at most `limit` if > 0."""
    windows = [stream[i : i + seq_len] for i in range(0, len(stream) - 1, seq_len)]
    windows = [w for w in windows if len(w) > 1]
    return windows[:limit] if limit > 0 else windows


def _mean_nll(model, windows, batch_size: int) -> float:
    """Mean next-token negative log-likelihood (nats) over every target of every window."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        # Windows of equal length batch together; the short last one goes alone.
        for length in sorted({len(w) for w in windows}, reverse=True):
            same = [w for w in windows if len(w) == length]
            for start in range(0, len(same), batch_size):
                batch = torch.stack(same[start : start + batch_size])
                logits = model(input_ids=batch).logits[:, :-1]
                total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum").item()
                count += batch[:, 1:].numel()
    model.train(was_training)
    return total / count


def _unigram_nll(train_stream, eval_windows, vocab_size: int) -> float:
    """Cross-entropy of an add-one-smoothed unigram model of the train split: the baseline a
    language model has to beat clearly."""
    import torch

    counts = torch.bincount(train_stream, minlength=vocab_size).double() + 1.0
    log_probs = counts.log() - counts.sum().log()
    targets = torch.cat([w[1:] for w in eval_windows])
    return float(-log_probs[targets].mean())


def train(
    out_dir: str | Path,
    *,
    tiny: bool = False,
    steps: int | None = None,
    recipe: Recipe | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Train the tiny OPT LM and write it to `out_dir` (safetensors, tokenizer, recipe.json).

    `tiny` selects MICRO_RECIPE (seconds; for tests), `steps` overrides the step count. Torch's
    global RNG, thread count and determinism flag are restored afterwards. Returns recipe.json's
    content."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    recipe = recipe or (MICRO_RECIPE if tiny else RECIPE)
    if steps is not None:
        recipe = dataclasses.replace(recipe, steps=steps, warmup_steps=min(recipe.warmup_steps, max(1, steps // 10)))
    out_dir = Path(out_dir)
    started, cpu_started = time.perf_counter(), time.process_time()

    splits = lm_splits()
    train_docs, eval_docs = splits.train, splits.evaluation
    if recipe.max_docs > 0:
        train_docs, eval_docs = train_docs[: recipe.max_docs], eval_docs[: recipe.max_docs]
    log(f"[tiny-lm] corpus: {len(train_docs)} train / {len(eval_docs)} eval documents "
        f"({sum(map(len, train_docs)) / 1e6:.2f} / {sum(map(len, eval_docs)) / 1e6:.2f} MB)")

    tokenizer = train_byte_bpe(train_docs, recipe.vocab_size, "opt", recipe.max_positions)  # from train text only: no peeking
    train_stream = _token_stream(tokenizer, train_docs)
    eval_windows = _windows(_token_stream(tokenizer, eval_docs), recipe.seq_len)
    # Same amount of train text scored in eval mode, to show the train/eval gap without dropout.
    train_windows = _windows(train_stream, recipe.seq_len, limit=len(eval_windows))
    log(f"[tiny-lm] tokens: {len(train_stream):,} train / {sum(len(w) for w in eval_windows):,} eval; "
        f"vocabulary {len(tokenizer)}")

    saved_threads, saved_deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(recipe.threads)
    torch.use_deterministic_algorithms(recipe.deterministic_algorithms)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)
            config = OPTConfig(
                vocab_size=len(tokenizer), hidden_size=recipe.hidden_size, word_embed_proj_dim=recipe.hidden_size,
                ffn_dim=recipe.ffn_dim, num_hidden_layers=recipe.num_layers, num_attention_heads=recipe.num_heads,
                max_position_embeddings=recipe.max_positions, dropout=recipe.dropout, attention_dropout=0.0,
                pad_token_id=PAD_ID, bos_token_id=EOS_ID, eos_token_id=EOS_ID, tie_word_embeddings=True,
            )
            model = OPTForCausalLM(config)
            model.train()
            metrics = _optimise(model, recipe, train_stream, eval_windows, log, started)
            train_nll = _mean_nll(model, train_windows, recipe.batch_size)
            eval_nll = _mean_nll(model, eval_windows, recipe.batch_size)
    finally:
        torch.set_num_threads(saved_threads)
        torch.use_deterministic_algorithms(saved_deterministic)

    unigram_nll = _unigram_nll(train_stream, eval_windows, len(tokenizer))
    wall = time.perf_counter() - started
    result = {
        "name": RECIPE_NAME,
        "recipe_hash": recipe_hash(recipe),
        "recipe": dataclasses.asdict(recipe),
        "corpus_sha256": corpus_hash(),
        "train_documents": len(train_docs),
        "eval_documents": len(eval_docs),
        "train_tokens": len(train_stream),
        "eval_tokens": sum(len(w) for w in eval_windows),
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_train_loss_dropout": metrics["final_train_loss"],  # mean of the last logged steps, dropout on
        "train_loss": train_nll,  # eval mode, on as many train tokens as the eval split has
        "train_perplexity": math.exp(train_nll),
        "eval_loss": eval_nll,
        "eval_perplexity": math.exp(eval_nll),
        "unigram_eval_perplexity": math.exp(unigram_nll),
        "eval_history": metrics["eval_history"],
        "wall_time_s": round(wall, 1),
        # CPU seconds of this process: with `threads` free cores, wall ~= cpu / threads. Shows
        # whether a long wall time came from sharing the cores.
        "cpu_time_s": round(time.process_time() - cpu_started, 1),
        "threads": recipe.threads,
        "torch": torch.__version__,
    }
    log(f"[tiny-lm] eval perplexity {result['eval_perplexity']:.2f} (unigram baseline "
        f"{result['unigram_eval_perplexity']:.1f}; train {result['train_perplexity']:.2f}); wall {wall:.0f} s")

    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.dropout = 0.0  # inference configuration; recipe.json keeps the training value
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "recipe.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _optimise(model, recipe: Recipe, train_stream, eval_windows, log, started: float) -> dict:
    import torch

    # No weight decay on biases and LayerNorm parameters (the usual GPT/OPT practice).
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.peak_lr, betas=(0.9, recipe.beta2),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, recipe))
    batches = torch.Generator().manual_seed(recipe.seed)
    max_start = len(train_stream) - recipe.seq_len
    if max_start <= 0:
        raise ValueError(f"the train split has {len(train_stream)} tokens, fewer than seq_len={recipe.seq_len}")

    recent: list[float] = []
    history: list[dict] = []
    loop_start = time.perf_counter()
    for step in range(recipe.steps):
        # Random windows rather than a fixed chunking: each pass sees the text at new offsets.
        starts = torch.randint(0, max_start + 1, (recipe.batch_size,), generator=batches)
        batch = torch.stack([train_stream[s : s + recipe.seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        scheduler.step()
        recent = (recent + [loss.item()])[-recipe.log_every :]

        done = step + 1
        if done % recipe.log_every == 0 or done == recipe.steps:
            elapsed = time.perf_counter() - loop_start
            rate = done * recipe.batch_size * recipe.seq_len / elapsed
            eta = elapsed / done * (recipe.steps - done)
            log(f"[tiny-lm] step {done:5d}/{recipe.steps}  loss {sum(recent) / len(recent):.3f}  "
                f"lr {scheduler.get_last_lr()[0]:.2e}  {rate:,.0f} tok/s  elapsed {time.perf_counter() - started:.0f} s  eta {eta:.0f} s")
        if recipe.eval_every > 0 and done % recipe.eval_every == 0 and done < recipe.steps:
            eval_nll = _mean_nll(model, eval_windows, recipe.batch_size)
            history.append({"step": done, "eval_loss": eval_nll, "eval_perplexity": math.exp(eval_nll)})
            log(f"[tiny-lm] step {done:5d}  eval loss {eval_nll:.3f}  perplexity {math.exp(eval_nll):.2f}")
    return {"final_train_loss": sum(recent) / len(recent), "eval_history": history}


def is_current(folder: Path, recipe: Recipe = RECIPE) -> bool:
    """True when `folder` holds a complete model trained from `recipe` on the current corpus."""
    try:
        stored = json.loads((folder / "recipe.json").read_text())
    except (OSError, ValueError):
        return False
    return stored.get("recipe_hash") == recipe_hash(recipe) and (folder / "model.safetensors").is_file()


def ensure_tiny_lm(out: str | Path | None = None, force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Folder of the trained tiny OPT LM: `out`, else $CPTQ_CACHE_DIR/tiny-opt-lm-v1. Trains (about
    10 minutes) when the folder is missing, stale (recipe or corpus changed) or `force`."""
    folder = Path(out) if out is not None else default_dir()
    if not force and is_current(folder):
        return folder
    # Train beside the target and swap in at the end, so an interrupted run never leaves a
    # half-written folder that looks complete.
    staging = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        train(staging, log=log)
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default: {default_dir()})")
    parser.add_argument("--force", action="store_true", help="retrain even if the folder is current")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    folder = ensure_tiny_lm(args.out, force=args.force)
    stored = json.loads((folder / "recipe.json").read_text())
    print(f"{folder}\n  eval perplexity {stored['eval_perplexity']:.2f} (unigram {stored['unigram_eval_perplexity']:.1f}), "
          f"trained in {stored['wall_time_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
