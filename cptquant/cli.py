"""Command-line entry points. Thin: each command lives in cptquant/commands/.

The console scripts install the interrupt handlers (output_folder.install_startup_handlers) before anything
heavy loads, so the seconds of importing torch and transformers answer SIGTERM/SIGHUP/SIGINT like the rest of
a run does. The Typer apps are therefore built on first use (`app`, `export_app`), not at import.
"""

from __future__ import annotations

import functools
import sys
from typing import TYPE_CHECKING

from .output_folder import install_startup_handlers, pause_point  # stdlib only

if TYPE_CHECKING:
    import typer


@functools.cache
def _apps() -> tuple[typer.Typer, typer.Typer]:
    """(app, export_app): the `cptq` group and the `cptq-export` command, with the commands they import."""
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
    return app, export_app


def __getattr__(name: str) -> typer.Typer:
    if name == "app":
        return _apps()[0]
    if name == "export_app":
        return _apps()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _run(which: int) -> None:
    """Run the app `_apps()[which]` as a console script, with a usage error (an unknown option, a value of the
    wrong type) said in one line, exit code 2, like every other bad input, instead of the framework's framed box."""
    install_startup_handlers()
    pause_point("startup")  # tests: a signal here, before torch and transformers load
    command = _apps()[which]
    import typer

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
    _run(0)


def export_main() -> None:
    _run(1)


if __name__ == "__main__":
    main()
