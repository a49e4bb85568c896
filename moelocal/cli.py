"""The `moelocal` command: builds the app, registers commands, formats errors in one place."""

from __future__ import annotations

import sys

import typer

from moelocal import __version__
from moelocal.commands import batch as batch_cmd
from moelocal.commands import bench as bench_cmd
from moelocal.commands import chat as chat_cmd
from moelocal.commands import fit as fit_cmd
from moelocal.commands import generate as generate_cmd
from moelocal.commands import inspect as inspect_cmd
from moelocal.commands import models as models_cmd
from moelocal.commands import pull as pull_cmd
from moelocal.commands import serve as serve_cmd
from moelocal.commands import worker as worker_cmd

app = typer.Typer(
    name="moelocal",
    help="Run Mixture-of-Experts GGUF models on your own machine, with the experts placed for you.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"moelocal {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """Run Mixture-of-Experts GGUF models on your own machine, with the experts placed for you."""


for _module in (inspect_cmd, fit_cmd, pull_cmd, models_cmd, chat_cmd, generate_cmd, batch_cmd, serve_cmd,
                worker_cmd, bench_cmd):
    _module.register(app)


def main(argv: list[str] | None = None) -> None:
    """Entry point: every MoelocalError becomes one line on stderr and its exit code."""
    from moelocal.errors import MoelocalError

    try:
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except MoelocalError as exc:
        _fail(exc, exc.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("Interrupted.\n")
        sys.exit(130)
    except Exception as exc:  # click's own usage errors and anything we did not foresee
        # Typer vendors its own copy of click, so match click's exception classes by name
        kinds = {k.__name__ for k in type(exc).__mro__}
        if "Exit" in kinds and hasattr(exc, "exit_code"):
            sys.exit(exc.exit_code)
        if "Abort" in kinds:
            sys.stderr.write("Aborted.\n")
            sys.exit(130)
        if "ClickException" in kinds:
            exc.show()
            sys.exit(exc.exit_code)
        hub = _hub_error(exc)
        if hub is not None:
            _fail(hub, hub.exit_code)
        from moelocal import config

        if config.debug():
            raise
        sys.stderr.write(
            f"Error: unexpected {type(exc).__name__}: {exc}\n"
            "This is a bug in moelocal; run again with MOELOCAL_DEBUG=1 and report the traceback.\n"
        )
        sys.exit(70)


def _fail(exc: Exception, code: int) -> None:
    from moelocal import config

    if config.debug():
        import traceback

        traceback.print_exception(exc)
    sys.stderr.write(f"Error: {exc}\n")
    sys.exit(code)


def _hub_error(exc: Exception):
    """huggingface_hub's errors, mapped to ours (None when it is not one of them)."""
    try:
        from moelocal.hub import translate_hub_error
    except ImportError:
        return None
    return translate_hub_error(exc)
