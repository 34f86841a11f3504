"""An offline, deterministic English corpus built from the documentation installed with Python.

No download and no data committed in bulk: the docstrings of standard-library modules are real
English prose, present on every machine that runs Python, and stable for a given Python version.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import importlib.util
import os
import random
import re
import sysconfig
from pathlib import Path
from typing import NamedTuple

# Modules with long, prose-like docstrings. Order matters for determinism.
_MODULES = (
    "argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "email", "enum", "fractions", "functools", "heapq", "http.client", "inspect", "io",
    "itertools", "json", "logging", "mailbox", "multiprocessing", "os", "pathlib", "pickle", "pprint",
    "random", "re", "shutil", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "typing", "unittest", "urllib.parse", "uuid", "warnings",
    "zipfile",
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_WORDY = re.compile(r"^[A-Z][A-Za-z0-9 ,;:'()\-]+[.!?]$")


@functools.lru_cache(maxsize=1)
def _docstrings() -> tuple[str, ...]:
    """Docstrings of the modules above, read from their source with `ast` (see `_file_docstrings`):
    inspecting live module objects made the corpus depend on what the process had imported before.
    Read once per process (a second or so; every export's parity check and calibration asks)."""
    texts: list[str] = []
    for module_name in _MODULES:
        spec = importlib.util.find_spec(module_name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        texts.extend(_file_docstrings(Path(spec.origin)))
    return tuple(texts)


def sentences(min_words: int = 6, max_words: int = 40) -> list[str]:
    """All prose sentences, deduplicated, in a stable order."""
    seen: set[str] = set()
    out: list[str] = []
    for doc in _docstrings():
        for paragraph in doc.split("\n\n"):
            flat = " ".join(paragraph.split())
            for sentence in _SENTENCE_END.split(flat):
                words = sentence.split()
                if min_words <= len(words) <= max_words and _WORDY.match(sentence) and sentence not in seen:
                    seen.add(sentence)
                    out.append(sentence)
    return out


EVALUATION_SIZE = 450  # sentences held out for evaluation; calibration never sees them


def _shuffled() -> list[str]:
    pool = sentences()
    random.Random(0).shuffle(pool)
    return pool


def evaluation_sentences(n: int | None = None) -> list[str]:
    """Held-out sentences for quality measurements, disjoint from `calibration_sentences()`."""
    held_out = _shuffled()[-EVALUATION_SIZE:]
    if n is not None and n > len(held_out):
        raise ValueError(f"the offline corpus holds out {len(held_out)} evaluation sentences; asked for {n}")
    return held_out if n is None else held_out[:n]


def calibration_sentences() -> list[str]:
    """Sentences for calibration: everything not held out for evaluation."""
    return _shuffled()[:-EVALUATION_SIZE]


# --- Long-form documents for training and evaluating a small language model -------------------
#
# The sentences above are too few (~1150) to train a language model. The documents below use
# everything prose-like that a Python installation ships: the language reference topics in
# `pydoc_data` and every docstring in the pure-Python standard library. Docstrings are read with
# `ast` from the source files instead of importing the modules, so building the corpus has no side
# effects (no `antigravity`, no Tk) and does not depend on which optional C extensions exist.

# Folders of the standard library whose text is tests, generated tables or tools, not prose.
_SKIPPED_STDLIB_DIRS = frozenset(
    {"__pycache__", "site-packages", "dist-packages", "test", "tests", "idlelib", "turtledemo",
     "lib2to3", "distutils", "encodings", "ensurepip", "tkinter"}
)
_MIN_DOCUMENT_CHARS = 200


def _stdlib_source_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorting in place fixes os.walk's traversal order.
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_STDLIB_DIRS and not d.startswith(("test", "config-")))
        files.extend(Path(dirpath) / name for name in sorted(filenames) if name.endswith(".py"))
    return files


def _file_docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [doc for node in ast.walk(tree) if isinstance(node, nodes) and (doc := ast.get_docstring(node))]


@functools.lru_cache(maxsize=1)
def _documents() -> tuple[str, ...]:
    import pydoc_data.topics

    seen: set[str] = set()
    out: list[str] = []

    def add(parts: list[str]) -> None:
        # A docstring repeated in many places (overrides, aliases) is kept once, where first seen.
        fresh = []
        for part in parts:
            part = part.strip()
            if part and part not in seen:
                seen.add(part)
                fresh.append(part)
        text = "\n\n".join(fresh)
        if len(text) >= _MIN_DOCUMENT_CHARS:
            out.append(text)

    for key in sorted(pydoc_data.topics.topics):
        add([pydoc_data.topics.topics[key]])
    for path in _stdlib_source_files():
        add(_file_docstrings(path))
    return tuple(out)


def documents() -> list[str]:
    """Offline English documents in a stable order: each pydoc topic, then the docstrings of each
    standard-library source file joined into one document. Deduplicated; about 1.9 MB of text on
    Python 3.11. Depends only on the Python version (see `corpus_hash`)."""
    return list(_documents())


def corpus_hash(docs: list[str] | None = None) -> str:
    """SHA-256 of the documents (default: `documents()`), to tie trained artefacts to their text."""
    digest = hashlib.sha256()
    for doc in _documents() if docs is None else docs:
        digest.update(doc.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def _document_bucket(doc: str) -> float:
    """A stable number in [0, 1) from the text alone, so a document's split never depends on
    which other documents exist or on their order."""
    return int.from_bytes(hashlib.sha256(doc.encode("utf-8")).digest()[:8], "big") / 2.0**64


class LMSplits(NamedTuple):
    train: list[str]
    calibration: list[str]
    evaluation: list[str]


def lm_splits(calibration_fraction: float = 0.1, evaluation_fraction: float = 0.1) -> LMSplits:
    """Disjoint train / calibration / evaluation documents, assigned by document hash.

    Evaluation is disjoint from calibration (quantization must not be scored on the text it was
    calibrated on) and from training (perplexity must not be scored on memorised text)."""
    if calibration_fraction < 0 or evaluation_fraction < 0 or calibration_fraction + evaluation_fraction >= 1:
        raise ValueError("calibration and evaluation fractions must be >= 0 and sum to less than 1")
    splits = LMSplits([], [], [])
    for doc in _documents():
        bucket = _document_bucket(doc)
        if bucket < evaluation_fraction:
            splits.evaluation.append(doc)
        elif bucket < evaluation_fraction + calibration_fraction:
            splits.calibration.append(doc)
        else:
            splits.train.append(doc)
    return splits


# --- Text of another domain, for evaluation only ------------------------------------------------
#
# The calibration text is docstrings. Quality measured on more docstrings says little about a user
# whose text is anything else, so evaluation also runs on text of other kinds found on every
# machine this project runs on: legal prose (the license texts Debian ships in
# /usr/share/common-licenses) and a user manual (IDLE's help page, shipped with Python). None of it
# is ever calibration text.

_LICENSE_DIR = Path("/usr/share/common-licenses")
_MIN_PARAGRAPH_WORDS = 8


def _idle_help_text() -> str:
    import html

    spec = importlib.util.find_spec("idlelib")
    path = Path(spec.origin).parent / "help.html" if spec and spec.origin else None
    if path is None or not path.is_file():
        return ""
    page = path.read_text(encoding="utf-8", errors="replace")
    page = page.split('<div class="body"', 1)[-1]  # skip the navigation header
    page = re.sub(r"<(script|style)\b.*?</\1>", " ", page, flags=re.S)
    page = re.sub(r"</(p|li|dd|dt|h[1-6]|pre|div)>", "\n\n", page)
    return html.unescape(re.sub(r"<[^>]+>", " ", page))


@functools.lru_cache(maxsize=1)
def _other_domain_documents() -> tuple[tuple[str, str], ...]:
    """(source, paragraph) pairs: each license text once (symlinked duplicates skipped), then IDLE's help."""
    docs: list[tuple[str, str]] = []
    seen_files: set[str] = set()
    if _LICENSE_DIR.is_dir():
        for path in sorted(_LICENSE_DIR.iterdir()):
            if path.is_symlink() or not path.is_file():
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            digest = hashlib.sha256(text.encode()).hexdigest()
            if digest not in seen_files:
                seen_files.add(digest)
                docs.append((f"license:{path.name}", text))
    docs.append(("manual:idle", _idle_help_text()))
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    for source, text in docs:
        for paragraph in re.split(r"\n\s*\n", text):
            flat = " ".join(paragraph.split()).replace(" ¶", "")
            if len(flat.split()) >= _MIN_PARAGRAPH_WORDS and flat not in seen:
                seen.add(flat)
                out.append((source, flat))
    return tuple(out)


def other_domain_paragraphs() -> list[str]:
    """English paragraphs of other domains than the calibration docstrings (legal text and a user
    manual), shuffled with a fixed seed so that any prefix mixes both; for evaluation only. Empty
    where neither source exists."""
    paragraphs = [text for _, text in _other_domain_documents()]
    random.Random(0).shuffle(paragraphs)
    return paragraphs


def other_domain_sentences(n: int | None = None, min_words: int = 6, max_words: int = 40) -> list[str]:
    """Sentences of `other_domain_paragraphs()`, deduplicated, shuffled with a fixed seed, for
    encoder evaluation (what `evaluation_sentences` is for the docstring domain)."""
    seen: set[str] = set()
    out: list[str] = []
    for paragraph in other_domain_paragraphs():
        for sentence in _SENTENCE_END.split(paragraph):
            words = sentence.split()
            if min_words <= len(words) <= max_words and sentence not in seen:
                seen.add(sentence)
                out.append(sentence)
    random.Random(0).shuffle(out)
    if n is not None and n > len(out):
        raise ValueError(f"the other-domain text holds {len(out)} sentences; asked for {n}")
    return out if n is None else out[:n]
