"""The CLI's commands, one module each; cptquant/cli.py only registers them."""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import typer

from ..errors import CptqError


def quiet_libraries() -> None:
    """Library chatter (deprecations, tracer warnings) would bury our one-line messages."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    for name in ("transformers", "optimum", "torch.onnx", "sentence_transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


P = ParamSpec("P")
R = TypeVar("R")


def user_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn CptqError into one line on stderr and exit code 2; SIGTERM/SIGHUP/SIGINT into one line and
    exit code 128 + the signal's number, after every staging folder has been removed."""
    from ..output_folder import Interrupted, handle_signals

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        quiet_libraries()
        try:
            with handle_signals():
                return fn(*args, **kwargs)
        except CptqError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise typer.Exit(2) from None
        except Interrupted as exc:
            print(exc.message, file=sys.stderr)
            raise typer.Exit(exc.exit_code) from None

    return wrapper
