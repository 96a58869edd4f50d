"""Error types and the exit codes they map to.

Every failure the library can foresee raises a subclass of :class:`D3ipError`; the
CLI catches it, prints ``error: <message>`` as one line on stderr and exits with the
class's ``exit_code``. Anything else is a bug and exits with :data:`EXIT_INTERNAL`.

=====  ============================================================
code   meaning
=====  ============================================================
0      success
1      internal error (a bug: please report it; ``--debug`` shows the traceback)
2      usage error: bad option value, unknown task/method, inconsistent options
3      bad input data: unreadable, corrupt, inconsistent or unsupported file
4      output problem: exists (use ``--overwrite``), or cannot be written
5      resource exhaustion: out of memory or disk
6      a needed optional component is missing (named in the message)
130    interrupted (SIGINT/SIGTERM); a checkpoint was saved when one was asked for
=====  ============================================================
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_OUTPUT = 4
EXIT_RESOURCE = 5
EXIT_MISSING = 6
EXIT_INTERRUPTED = 130
EXIT_CLOSED_PIPE = 141  # 128 + SIGPIPE, as a shell reports a tool that its reader closed on (`| head`)


class D3ipError(Exception):
    """Base class of foreseen failures; ``str(err)`` is the one-line message."""

    exit_code = EXIT_INTERNAL


class UsageError(D3ipError):
    """An option value is invalid or options contradict each other."""

    exit_code = EXIT_USAGE


class FrameRequired(UsageError):
    """A 4D input was given without ``--frame``; ``frames`` says how many it holds."""

    def __init__(self, message: str, frames: int) -> None:
        super().__init__(message)
        self.frames = frames


class InputDataError(D3ipError):
    """An input file is missing, unreadable, corrupt or inconsistent."""

    exit_code = EXIT_INPUT


class OutputError(D3ipError):
    """The output exists (without ``--overwrite``) or cannot be written."""

    exit_code = EXIT_OUTPUT


class ResourceError(D3ipError):
    """Memory or disk ran out; the message says what would fit."""

    exit_code = EXIT_RESOURCE


class MissingComponentError(D3ipError):
    """An optional dependency (plugin, decoder, backend) is not installed."""

    exit_code = EXIT_MISSING


class Interrupted(D3ipError):
    """The run was interrupted by a signal."""

    exit_code = EXIT_INTERRUPTED
