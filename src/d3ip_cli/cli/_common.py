"""Shared pieces of the command modules: stderr console, option aliases, error handling.

Commands are thin: options -> config -> library call -> write. Library errors
(:class:`~d3ip_cli.core.errors.D3ipError`) become one ``error:`` line on stderr and
the exit code of their class; heavy imports happen inside command bodies.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console

from d3ip_cli.core.errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_RESOURCE,
    D3ipError,
)

err_console = Console(stderr=True, highlight=False)

STATE: dict[str, Any] = {"debug": bool(os.environ.get("D3IP_DEBUG"))}

# Option aliases shared by several commands.
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the run record as one JSON object on stdout.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed (all randomness derives from it).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
OutputOpt = Annotated[Optional[Path], typer.Option("-o", "--output", help="Output path.")]


def log(message: str) -> None:
    """A log line on stderr (never stdout)."""
    err_console.print(message)


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/yellow] {message}")


def emit_json(doc: Any) -> None:
    """Print exactly one JSON object on stdout."""
    from d3ip_cli.io.atomic import _json_default

    sys.stdout.write(json.dumps(doc, default=_json_default) + "\n")
    sys.stdout.flush()


def _fail(message: str, code: int) -> typer.Exit:
    err_console.print(f"[bold red]error:[/bold red] {message}", soft_wrap=True)
    return typer.Exit(code)


def guarded(fn: Callable) -> Callable:
    """Turn foreseen failures into one stderr line and a documented exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except D3ipError as exc:
            if STATE["debug"]:
                err_console.print_exception()
            raise _fail(str(exc), exc.exit_code) from None
        except KeyboardInterrupt:
            raise _fail("interrupted", EXIT_INTERRUPTED) from None
        except MemoryError:
            raise _fail("out of memory: try fewer slices (--slices A:B) or a smaller grid (--grid N)", EXIT_RESOURCE) from None
        except Exception as exc:  # noqa: BLE001 - the single top-level handler
            if _is_oom(exc):
                raise _fail(f"out of memory ({type(exc).__name__}): try fewer slices (--slices A:B) or a smaller grid (--grid N)",
                            EXIT_RESOURCE) from None
            if STATE["debug"]:
                err_console.print_exception()
            msg = str(exc).splitlines()[0] if str(exc) else ""
            raise _fail(f"internal error: {type(exc).__name__}: {msg} (re-run with --debug for the traceback; please report it)",
                        EXIT_INTERNAL) from None

    return wrapper


def _is_oom(exc: BaseException) -> bool:
    name = type(exc).__name__
    return name == "OutOfMemoryError" or "out of memory" in str(exc).lower()
