"""Command-line entry points. Thin: each command lives in cptquant/commands/."""

from __future__ import annotations

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


def main() -> None:
    app()


def export_main() -> None:
    export_app()


if __name__ == "__main__":
    main()
