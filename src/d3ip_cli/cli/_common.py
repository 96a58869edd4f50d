"""Shared pieces of the command modules: stderr console, option aliases, error handling.

Commands are thin: options -> config -> library call -> write. Library errors
(:class:`~d3ip_cli.core.errors.D3ipError`) become one ``error:`` line on stderr and
the exit code of their class; heavy imports happen inside command bodies.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape

from d3ip_cli.core.errors import (
    EXIT_CLOSED_PIPE,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_RESOURCE,
    D3ipError,
)

# emoji=False: ":100:" in "--slices 0:100" or a file name must reach the terminal as typed
err_console = Console(stderr=True, highlight=False, emoji=False)

STATE: dict[str, Any] = {"debug": bool(os.environ.get("D3IP_DEBUG"))}

# Option aliases shared by several commands.
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the run record as one JSON object on stdout.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed (all randomness derives from it).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
OutputOpt = Annotated[Optional[Path], typer.Option("-o", "--output", help="Output path.")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="CPU threads of torch (default: torch's choice, "
                                                                      "or OMP_NUM_THREADS; under torchrun, per process).")]

# Task options shared by simulate and reconstruct (validated by d3ip_cli.core.config).
TaskOpt = Annotated[Optional[str], typer.Option("--task", help="sparse-view, limited-angle or cs-mri.")]
ViewsOpt = Annotated[int, typer.Option("--views", help="sparse-view: number of views uniform on [0, 180).")]
ArcOpt = Annotated[float, typer.Option("--arc", help="limited-angle: arc in degrees (1-degree steps), in (0, 180].")]
AccelerationOpt = Annotated[float, typer.Option("--acceleration", help="cs-mri: undersampling factor R >= 1.")]
MaskOpt = Annotated[str, typer.Option("--mask", help="cs-mri: uniform1d, gaussian1d or poisson2d.")]
CenterFractionOpt = Annotated[float, typer.Option("--center-fraction", help="cs-mri: fully sampled centre fraction.")]
CoilsOpt = Annotated[int, typer.Option("--coils", help="cs-mri: simulated coils (1: single coil; >1: SENSE).")]
BackendOpt = Annotated[str, typer.Option("--backend", help="CT projector: auto, native, torch-radon or astra.")]
SlicesOpt = Annotated[Optional[str], typer.Option("--slices", help="Slab A:B of the slice axis (0-based, B excluded).")]
GridOpt = Annotated[Optional[int], typer.Option("--grid", help="Resample in-plane to N x N (anti-aliased).")]
NoiseOpt = Annotated[str, typer.Option("--noise", help="none, poisson (CT photon counts) or gaussian.")]
I0Opt = Annotated[float, typer.Option("--i0", help="poisson: incident photons per detector bin.")]
SigmaOpt = Annotated[float, typer.Option("--sigma", help="gaussian: noise std relative to the RMS of the data.")]
SeriesOpt = Annotated[Optional[str], typer.Option("--series", help="DICOM SeriesInstanceUID (prefix) to read.")]
FrameOpt = Annotated[Optional[int], typer.Option("--frame", help="Volume index of a 4D input (ISMRMRD: repetition).")]


def set_threads(threads: int | None) -> None:
    """Apply ``--threads`` (``None``: leave torch's choice); fewer than one is a usage error."""
    if threads is None:
        return
    if threads < 1:
        from d3ip_cli.core.errors import UsageError

        raise UsageError(f"--threads must be at least 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def log(message: str) -> None:
    """A log line on stderr (never stdout), printed verbatim: file names such as ``scan[v2].nii``
    are not rich markup."""
    err_console.print(message, markup=False, soft_wrap=True)


def warn(message: str, label: str = "warning") -> None:
    """``warning: message`` on stderr (the label coloured, the message verbatim)."""
    err_console.print(f"[yellow]{label}:[/yellow] {escape(message)}", soft_wrap=True)


def emit_json(doc: Any) -> None:
    """Print exactly one JSON object on stdout."""
    from d3ip_cli.io.atomic import _json_default

    sys.stdout.write(json.dumps(doc, default=_json_default) + "\n")
    sys.stdout.flush()


class progress_bar:
    """A rich progress bar on stderr driven by ``callback(step, total, info)`` (library convention).

    Usage: ``with progress_bar("reconstructing") as cb: library_call(progress=cb)``.
    Shows the step, the adaptation loss and the data residual when the engine reports
    them, elapsed time and ETA. When stderr is not a terminal (logs, pipelines) it prints
    a plain line at every tenth of each stage instead.
    """

    def __init__(self, label: str, disable: bool = False) -> None:
        self.label = label
        self.disable = disable
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}
        self._last_logged: dict[str, int] = {}

    def __enter__(self) -> Callable[[int, int, dict], None]:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                  console=err_console, transient=True,
                                  disable=self.disable or not err_console.is_terminal)
        self._progress.__enter__()
        return self.update

    @staticmethod
    def _info(info: dict) -> str:
        parts = []
        if info.get("adapt_loss") is not None:
            parts.append(f"adapt loss {info['adapt_loss']:.3g}")
        if info.get("residual") is not None:
            parts.append(f"residual {info['residual']:.3g}")
        return "  ".join(parts)

    def update(self, step: int, total: int, info: dict) -> None:
        info = info or {}
        stage = str(info.get("stage", self.label))
        key = stage.split(" slice ")[0]
        text = self._info(info)
        if key not in self._tasks:
            self._tasks[key] = self._progress.add_task(stage, total=total, info=text)
        self._progress.update(self._tasks[key], completed=step, total=total, description=stage, info=text)
        if not self.disable and not err_console.is_terminal and total:
            tenth = int(10 * step / total)
            if tenth != self._last_logged.get(stage) and (tenth > self._last_logged.get(stage, 0) or step == total):
                self._last_logged[stage] = tenth
                err_console.print(f"{stage}: {step}/{total} {text}".rstrip(), markup=False)

    def __exit__(self, *exc: Any) -> None:
        self._progress.__exit__(*exc)


def _fail(message: str, code: int) -> typer.Exit:
    message = (message.strip().splitlines() or [""])[0]  # one line, whatever a library folded into the text
    rank = os.environ.get("RANK", "0") if os.environ.get("WORLD_SIZE", "1") not in ("", "1") else "0"
    who = "" if rank == "0" else f" (rank {rank})"  # under torchrun every process reports; rank 0's line is plain
    err_console.print(f"[bold red]error{who}:[/bold red] {escape(message)}", soft_wrap=True)
    return typer.Exit(code)


def closed_pipe() -> typer.Exit:
    """The reader of stdout closed it early (``d3ip operators | head -1``): a normal end in a shell
    pipeline, not a bug. Nothing more is printed (stdout goes to /dev/null so that Python's own
    flush at exit stays quiet); exit 141, as a shell reports a tool stopped by SIGPIPE."""
    with contextlib.suppress(OSError, ValueError):
        if sys.stdout.fileno() == 1:  # the process's own stdout (not a test runner's capture)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
    return typer.Exit(EXIT_CLOSED_PIPE)


def stdout_closed() -> bool:
    """Whether the reader of this process's stdout has gone: a pipe whose read end is closed
    polls as an error for writing; rich, meeting it first, has already pointed fd 1 at
    /dev/null (and raised SystemExit(1))."""
    import select

    try:
        poller = select.poll()
        poller.register(1, select.POLLOUT)
        if any(ev & select.POLLERR for _, ev in poller.poll(0)):
            return True
        return os.path.samestat(os.fstat(1), os.stat(os.devnull))
    except (OSError, ValueError, AttributeError):  # no poll (Windows), no fd 1
        return False


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
        except BrokenPipeError:
            if not stdout_closed():
                raise  # another pipe broke (a worker, a FIFO output): not the reader of stdout
            raise closed_pipe() from None
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


# the acquisition options each task uses; any other one given on the command line is refused
TASK_ACQUISITION: dict[str, set[str]] = {
    "sparse-view": {"views", "backend"},
    "limited-angle": {"arc", "backend"},
    "cs-mri": {"acceleration", "mask", "center_fraction", "coils"},
}
NOISE_ACQUISITION: dict[str, set[str]] = {"poisson": {"i0"}, "gaussian": {"sigma"}}


def check_acquisition_options(ctx: typer.Context, task: str, noise: str) -> None:
    """Refuse (exit 2) acquisition options given on the command line that ``task`` (and
    ``--noise``) would silently ignore, e.g. ``--views`` with ``--task limited-angle``."""
    from d3ip_cli.core.errors import UsageError

    owners: dict[str, list[str]] = {}
    for t, names in TASK_ACQUISITION.items():
        for n in names:
            owners.setdefault(n, []).append(f"--task {t}")
    for k, names in NOISE_ACQUISITION.items():
        for n in names:
            owners.setdefault(n, []).append(f"--noise {k}")
    used = TASK_ACQUISITION.get(task, set()) | NOISE_ACQUISITION.get((noise or "none").lower(), set())
    unused = sorted(n for n in owners if n not in used
                    and getattr(ctx.get_parameter_source(n), "name", None) == "COMMANDLINE")
    if unused:
        n = unused[0]
        given = f"--noise {noise or 'none'}" if n in {m for names in NOISE_ACQUISITION.values() for m in names} \
            else f"--task {task}"
        raise UsageError(f"--{n.replace('_', '-')} does not apply to {given} (it is an option of "
                         f"{' and '.join(owners[n])})")
