"""The ``d3ip`` command line: a thin Typer skin over the library.

Each command lives in its own module and imports heavy libraries (torch, nibabel,
pydicom) inside its body, so ``d3ip --help`` answers instantly.
"""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from d3ip_cli import __version__
from d3ip_cli.cli import _common

app = typer.Typer(
    name="d3ip",
    help="Reconstruct undersampled 3D CT and MRI volumes with a phantom-trained diffusion prior "
    "adapted to each scan at test time (D3IP).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"d3ip {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of failures.")] = False,
) -> None:
    """d3ip: diffusion-prior reconstruction for few-view/limited-angle CT and accelerated MRI."""
    if debug:
        _common.STATE["debug"] = True


def _register() -> None:
    from d3ip_cli.cli import (  # noqa: F401 - modules register their commands on import
        bench,
        convert,
        info,
        metrics,
        operators,
        pretrain,
        recon,
        simulate,
    )

    for module in (info, convert, simulate, recon, pretrain, bench, operators, metrics):
        module.register(app)


_register()


def _click_error_types() -> tuple[type, type]:
    """Typer's (vendored click's) ``ClickException`` and ``Abort``, found through public names."""
    base = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
    return base, typer.Abort


def _sigterm_interrupts() -> None:
    """SIGTERM (a scheduler's pre-emption, ``kill``) stops a command as Ctrl-C does: partial
    outputs are removed, ``error: interrupted`` is printed, exit 130. Runs with
    ``--checkpoint-dir`` install their own handler, which saves the state first."""
    import signal

    def _term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, _term)
    except ValueError:  # not the main thread (an embedding application): leave its handlers alone
        pass


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point.

    Command-line parse errors (an unknown option, a value of the wrong type, a missing
    argument) become one ``error:`` line on stderr naming the fix, exit 2, as every other
    usage error; help and the commands themselves behave as under Typer's own runner.
    ``--debug`` (tracebacks of failures) is taken from anywhere on the line, so it works
    after every command, not only those that list it.
    """
    import sys

    from d3ip_cli.cli._common import err_console

    click_error, abort = _click_error_types()
    _sigterm_interrupts()
    args = list(sys.argv[1:] if argv is None else argv)
    head = args[:args.index("--")] if "--" in args else args
    if "--debug" in head:  # accepted anywhere on the line, before or after the command
        _common.STATE["debug"] = True
        args = [a for a in head if a != "--debug"] + args[len(head):]
    try:
        code = app(args=args, prog_name="d3ip", standalone_mode=False)
    except SystemExit as exc:  # Typer ends a closed pipe while printing help with exit 1: say 141, as commands do
        if exc.code == 1 and isinstance(exc.__context__, BrokenPipeError) and _common.stdout_closed():
            sys.exit(_common.closed_pipe().exit_code)
        raise
    except click_error as exc:
        message = exc.format_message().strip()
        if message:  # (none when the help was shown because no command was given)
            cmd = " ".join(exc.ctx.command_path.split()[1:]) if getattr(exc, "ctx", None) else ""
            hint = f" (see d3ip {cmd + ' ' if cmd else ''}--help)"
            from rich.markup import escape

            err_console.print(f"[bold red]error:[/bold red] {escape(message + hint)}", soft_wrap=True, highlight=False)
        sys.exit(getattr(exc, "exit_code", 2) or 2)
    except abort:
        err_console.print("[bold red]error:[/bold red] interrupted", soft_wrap=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
