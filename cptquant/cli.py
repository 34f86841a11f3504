"""Command-line entry points. Thin: each command lives in cptquant/commands/."""

from __future__ import annotations

import sys

import typer

from .commands import user_errors
from .commands.analyze import analyze
from .commands.export import export
from .commands.verify import verify

app = typer.Typer(help="cptquant: sensitivity-guided mixed-precision ONNX export for ONNX Runtime.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@app.callback()
def _group() -> None:
    """cptquant: sensitivity-guided mixed-precision ONNX export for ONNX Runtime."""


app.command("export")(export)
app.command("analyze")(user_errors(analyze))
app.command("verify")(verify)

export_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
export_app.command()(export)


def _run(command: typer.Typer) -> None:
    """Run `command` as a console script, with a usage error (an unknown option, a value of the wrong type)
    said in one line, exit code 2, like every other bad input, instead of the framework's framed box."""
    try:
        code = command(standalone_mode=False)
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        sys.exit(1)
    except Exception as exc:  # typer's vendored click UsageError: exit_code 2 and a one-line message
        if getattr(exc, "exit_code", None) != 2 or not hasattr(exc, "format_message"):
            raise
        message = " ".join(exc.format_message().split())
        if message:  # empty: no arguments at all, and the help was printed
            print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


def main() -> None:
    _run(app)


def export_main() -> None:
    _run(export_app)


if __name__ == "__main__":
    main()
