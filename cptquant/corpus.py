"""An offline, deterministic English corpus built from the documentation installed with Python.

No download and no data committed in bulk: the docstrings of standard-library modules are real
English prose, present on every machine that runs Python, and stable for a given Python version.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re

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


def _docstrings() -> list[str]:
    texts: list[str] = []
    for module_name in _MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        objects = [module] + [obj for _, obj in sorted(vars(module).items()) if inspect.isclass(obj) or inspect.isfunction(obj)]
        for obj in objects:
            doc = inspect.getdoc(obj)
            if doc and getattr(obj, "__module__", module_name).startswith(module_name.split(".")[0]):
                texts.append(doc)
    return texts


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


def split_corpus(n_calib: int, n_eval: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint calibration and evaluation sentences, shuffled with `seed`."""
    pool = sentences()
    random.Random(seed).shuffle(pool)
    if n_calib + n_eval > len(pool):
        raise ValueError(f"the offline corpus has {len(pool)} sentences; asked for {n_calib + n_eval}")
    return pool[:n_calib], pool[n_calib : n_calib + n_eval]
