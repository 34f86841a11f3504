"""Calibration data: texts from a file, JSONL, a Hugging Face dataset or the offline corpus, tokenized.

Every pass runs on the same `CalibrationSet`, so the forward-pass cost (FPE) of each method is
measured on exactly the tokens it analysed.
"""

from __future__ import annotations

import json
import random
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..corpus import calibration_sentences
from ..errors import CptqError
from ..model_loading import LoadedModel
from ..options import MIN_SAMPLES, CalibrationOptions

# Undecodable bytes tolerated in a calibration file (a Latin-1 accent here and there), as a share of its
# characters; random or binary data decodes to about half replacement characters.
MAX_UNDECODABLE = 0.1
BATCH_SIZE = 8


@dataclass
class CalibrationSet:
    batches: list[dict[str, torch.Tensor]]  # each: input_ids, attention_mask ([B, T], right-padded)
    source: str
    seq_len: int
    meta: dict[str, int] = field(default_factory=dict)  # samples, seed; a subset's: subset_of

    @property
    def num_samples(self) -> int:
        return sum(int(b["input_ids"].shape[0]) for b in self.batches)

    @property
    def num_tokens(self) -> int:
        return sum(int(b["attention_mask"].sum()) for b in self.batches)


def max_positions(config: object) -> int | None:
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def read_text_file(path: Path, what: str = "calibration file") -> str:
    """The file as text; one clear error for a file that is not (NUL bytes, or mostly undecodable)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CptqError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if b"\0" in data:
        raise CptqError(f"{what} {path} is not text (it contains NUL bytes)")
    text = data.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")
    if text and bad > MAX_UNDECODABLE * len(text):
        raise CptqError(f"{what} {path} is not UTF-8 text ({bad / len(text):.0%} of it cannot be decoded)")
    return text


def _texts_from_plain(path: Path) -> list[str]:
    text = read_text_file(path)
    # Blank-line separated paragraphs when the file has them, else one sample per line.
    if "\n\n" in text.strip():
        return [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _texts_from_jsonl(path: Path, text_field: str) -> list[str]:
    texts = []
    for number, line in enumerate(read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise CptqError(f"{path}: line {number} is not valid JSON") from None
        if not isinstance(record, dict) or text_field not in record:
            raise CptqError(f"{path}: line {number} has no text field {text_field!r} (set --text-field)")
        if isinstance(record[text_field], str) and record[text_field].strip():
            texts.append(record[text_field].strip())
    return texts


def _texts_from_hub(spec: str, text_field: str) -> list[str]:
    parts = spec[len("hf:"):].split(":")
    if len(parts) == 2:
        name, config_name, split = parts[0], None, parts[1]
    elif len(parts) == 3:
        name, config_name, split = parts
    else:
        raise CptqError(f"--calib {spec!r}: use hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
    if not name.strip() or not split.strip() or config_name is not None and not config_name.strip():
        raise CptqError(f"--calib {spec!r}: NAME, CONFIG and SPLIT must not be empty (hf:NAME:SPLIT or "
                        "hf:NAME:CONFIG:SPLIT)")
    try:
        import datasets
    except ImportError:
        raise CptqError("--calib hf:... needs the optional package 'datasets' (pip install 'cptquant[data]')") from None
    try:
        data = datasets.load_dataset(name, config_name, split=split)
    except Exception as exc:  # offline, unknown name or split: all user-fixable
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CptqError(f"cannot load dataset {name!r} split {split!r} ({first})") from None
    if text_field not in data.column_names:
        raise CptqError(f"dataset {name!r} has no column {text_field!r}; columns: {', '.join(data.column_names)}")
    return [t.strip() for t in data[text_field] if isinstance(t, str) and t.strip()]


def _offline_corpus_texts(seq_len: int) -> list[str]:
    """Consecutive corpus sentences packed into samples of about `seq_len` tokens (words * 1.3)."""
    samples: list[str] = []
    current: list[str] = []
    words = 0
    for sentence in calibration_sentences():  # never the held-out evaluation sentences
        current.append(sentence)
        words += len(sentence.split())
        if words * 1.3 >= seq_len:
            samples.append(" ".join(current))
            current, words = [], 0
    return samples


def load_texts(calib: str | None, text_field: str = "text", seq_len: int = 128) -> tuple[list[str], str]:
    """The raw calibration texts and a short description of where they came from."""
    if calib is None:
        return _offline_corpus_texts(seq_len), "offline corpus (stdlib docstrings)"
    if calib.startswith("hf:"):
        return _texts_from_hub(calib, text_field), calib
    if not calib.strip():
        raise CptqError("--calib is empty; give a file, or leave it out for the offline corpus")
    path = Path(calib)
    if path.is_dir():
        raise CptqError(f"calibration path {calib} is a folder; give a text or JSONL file")
    if not path.is_file():
        raise CptqError(f"calibration file not found: {calib}")
    texts = _texts_from_jsonl(path, text_field) if path.suffix.lower() in (".jsonl", ".ndjson") else _texts_from_plain(path)
    if not texts:
        raise CptqError(f"calibration file {calib} is empty")
    return texts, str(path)


def check_calibration_file(calib: str | None, text_field: str = "text") -> None:
    """A --calib file exists and reads as text (a hub dataset is only checked when loaded)."""
    if calib is not None and not calib.startswith("hf:"):
        load_texts(calib, text_field)


def calibration_texts_for_overlap(calib: str | None, text_field: str = "text") -> tuple[set[str], str] | None:
    """The individual texts a calibration spec reads (stripped), to check evaluation text against;
    None for a hub dataset, which is not downloaded again only for this."""
    if calib is None:
        return {s.strip() for s in calibration_sentences()}, "the offline corpus"
    if calib.startswith("hf:") or not Path(calib).is_file():
        return None
    texts, source = load_texts(calib, text_field)
    return {t.strip() for t in texts}, source


def _pad(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _batched(rows: list[list[int]], pad_id: int) -> list[dict[str, torch.Tensor]]:
    return [_pad(rows[i : i + BATCH_SIZE], pad_id) for i in range(0, len(rows), BATCH_SIZE)]


def build_calibration(loaded: LoadedModel, calib: str | None = None, text_field: str = "text", samples: int = 64,
                      seq_len: int = 128, seed: int = 0) -> CalibrationSet:
    """Tokenized calibration batches for `loaded` (a LoadedModel); deterministic for a given seed."""
    CalibrationOptions(calib, text_field, samples, seq_len, seed)  # the amounts' own checks, the same as the CLI's
    limit = max_positions(loaded.config)
    if limit is not None and seq_len > limit:
        raise CptqError(f"--seq-len {seq_len} is above the model's {limit} positions")
    rng = random.Random(seed)
    tokenizer = loaded.tokenizer
    if tokenizer is None:
        # Tiny test models have no tokenizer: random ids in the vocabulary, varied lengths so masks matter.
        vocab = int(loaded.config.vocab_size)
        if calib is not None:
            raise CptqError("this model has no tokenizer, so --calib text cannot be tokenized")
        gen = torch.Generator().manual_seed(seed)
        rows: list[list[int]] = []
        for _ in range(samples):
            length = rng.randint(max(2, seq_len // 2), seq_len)
            rows.append(torch.randint(0, vocab, (length,), generator=gen).tolist())
        return CalibrationSet(_batched(rows, 0), "random token ids (model has no tokenizer)", seq_len,
                              {"samples": samples, "seed": seed})
    texts, source = load_texts(calib, text_field, seq_len)
    rows = []
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=seq_len)["input_ids"]
        if len(ids) >= 4:  # shorter ones carry no usable context
            rows.append(ids)
    if len(rows) < MIN_SAMPLES:
        raise CptqError(f"calibration data {source} has {len(rows)} usable samples; at least {MIN_SAMPLES} are needed")
    rng.shuffle(rows)
    rows = rows[:samples]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return CalibrationSet(_batched(rows, pad_id), source, seq_len, {"samples": len(rows), "seed": seed})


# Calibration sets already built, per torch model: one export calibrates once, and the plan's pass, GPTQ's
# Hessians, input smoothing and hot rows all read the same batches (no reader changes them in place).
_BUILT: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[object, ...], CalibrationSet]] = \
    weakref.WeakKeyDictionary()


def calibration_for(loaded: LoadedModel, spec: CalibrationOptions) -> CalibrationSet:
    """`build_calibration` with the text and amounts that `spec` names, built once per
    model and spec (a calibration file is read again when it changed since)."""
    key = (spec.calib, _file_state(spec.calib), spec.text_field, spec.calib_samples, spec.seq_len, spec.seed,
           loaded.task, id(loaded.tokenizer))
    built = _BUILT.setdefault(loaded.model, {})
    if key not in built:
        built[key] = build_calibration(loaded, spec.calib, spec.text_field, spec.calib_samples, spec.seq_len,
                                       spec.seed)
    return built[key]


def _file_state(calib: str | None) -> tuple[int, int] | None:
    try:
        stat = Path(calib).stat() if calib else None
    except (OSError, ValueError):  # a dataset name, not a file
        return None
    return (stat.st_mtime_ns, stat.st_size) if stat is not None else None


def calibration_subset(calib: CalibrationSet, fraction: float, min_samples: int = BATCH_SIZE) -> CalibrationSet:
    """The first `fraction` of the samples, at least `min_samples` (the samples are already shuffled by seed).

    CMPQ and PMPQ read such a subset to cost less than the oracle, which reads every sample.
    """
    wanted = max(min(min_samples, calib.num_samples), round(calib.num_samples * fraction))
    batches = []
    for batch in calib.batches:
        if wanted <= 0:
            break
        rows = min(wanted, batch["input_ids"].shape[0])
        width = int(batch["attention_mask"][:rows].sum(1).max())  # drop columns that are padding for all kept rows
        batches.append({key: value[:rows, :width] for key, value in batch.items()})
        wanted -= rows
    return CalibrationSet(batches, calib.source, calib.seq_len, {**calib.meta, "subset_of": calib.num_samples})
