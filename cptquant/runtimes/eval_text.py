"""The evaluation text and its tokens: the held-out sentences (or a user's `--eval` file) and a text encoder
that turns them into model inputs the same way for every variant."""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..corpus import evaluation_sentences
from ..errors import CptqError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase


def evaluation_texts(n: int) -> list[str]:
    """The held-out evaluation text. The one place to swap in another source (e.g. corpus.lm_splits())."""
    try:
        return evaluation_sentences(n)
    except ValueError as exc:
        raise CptqError(str(exc)) from None


@dataclass
class EvalSet:
    texts: list[str]
    labels: list[int | str] | None = None  # ints or label names, classification only


def load_eval_file(path: Path) -> EvalSet:
    """`.jsonl` lines {"text": ..., "label": ...} (label optional), or plain text, one example per line."""
    path = Path(path)
    if path.is_dir():
        raise CptqError(f"--eval {path} is a folder; give a text or JSONL file")
    if not path.is_file():
        raise CptqError(f"--eval file not found: {path}")
    from ..passes.calibration import read_text_file

    lines = [line for line in read_text_file(path, "--eval file").splitlines() if line.strip()]
    if not lines:
        raise CptqError(f"--eval file {path} has no text")
    if path.suffix != ".jsonl":
        return EvalSet(lines)
    texts, labels = [], []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            text = row["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CptqError(f"--eval {path}:{number}: expected a JSON object with a \"text\" key") from None
        if not isinstance(text, str):  # str(123) or str(None) would be scored as text
            raise CptqError(f"--eval {path}:{number}: \"text\" must be a string, not {json.dumps(text)}")
        label = row.get("label")
        if label is not None and (isinstance(label, bool) or not isinstance(label, (int, str))):
            raise CptqError(f"--eval {path}:{number}: \"label\" must be a class index or a label name, "
                            f"not {json.dumps(label)}")
        texts.append(text)
        labels.append(label)
    if all(label is None for label in labels):
        return EvalSet(texts)
    given = [label for label in labels if label is not None]
    if len(given) < len(labels):
        raise CptqError(f"--eval {path}: some lines have a label and some do not")
    return EvalSet(texts, given)


class TextEncoder:
    """Text to token ids: the model folder's tokenizer, or, for a folder without one (tiny test
    models), a deterministic word hash into the vocabulary so the same text always gives the same ids."""

    def __init__(self, folder: Path, config: PretrainedConfig, trust_remote_code: bool = False):
        self.vocab_size = int(config.vocab_size)
        self.tokenizer: PreTrainedTokenizerBase | None = None
        if any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
            from transformers import AutoTokenizer

            from ..safety import refuse_custom_code

            refuse_custom_code(folder, trust_remote_code)  # never a "[y/N]" prompt, never unasked-for code
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
            except (OSError, ValueError, TypeError, AttributeError) as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise CptqError(f"{folder}: cannot load the tokenizer ({first})") from None
        pad = getattr(self.tokenizer, "pad_token_id", None) if self.tokenizer else None
        self.pad_id = pad if pad is not None else (getattr(config, "pad_token_id", None) or 0)

    def _hash_ids(self, text: str) -> list[int]:
        # ids 0..3 are special in most vocabularies; keep hashed words out of them
        return [4 + zlib.crc32(word.encode()) % (self.vocab_size - 4) for word in text.split()]

    def ids(self, text: str) -> list[int]:
        if self.tokenizer is not None:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._hash_ids(text)

    def batch(self, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded input_ids and attention_mask for an encoder (with its special tokens)."""
        if self.tokenizer is not None:
            enc = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="np")
            return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
        rows = [self._hash_ids(t)[:max_length] or [4] for t in texts]
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return ids, mask

    def special_ids(self) -> set[int]:
        return set(self.tokenizer.all_special_ids) if self.tokenizer is not None else set()
