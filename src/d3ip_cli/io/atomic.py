"""Atomic, non-clobbering writes.

Every writer goes through :func:`atomic_output`: the file or directory is built under
a hidden temporary name beside the target and renamed into place only when complete,
so a killed write never leaves something that looks finished. An existing target is
refused unless ``overwrite`` is true. The hidden name records the writer's host and process;
a later write of the same target removes such leftovers, an hour old or more, of a process of
this host that no longer runs (a SIGKILL leaves them), never those of a live process or of another host.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from d3ip_cli.core.errors import OutputError

PARTIAL_PREFIX = ".d3ip-partial-"


def partial_path(kind: str, target: Path) -> Path:
    """``.d3ip-partial-[old-]NAME-XXXXXXXX-pidPID@HOST`` beside ``target``."""
    return target.parent / f"{PARTIAL_PREFIX}{kind}{target.name}-{uuid.uuid4().hex[:8]}-pid{os.getpid()}@{socket.gethostname()}"


STALE_AFTER_S = 3600.0
"""A leftover is removed only when it is also this old: a host name and pid do not identify a process
where two PID namespaces share both (containers with one host name writing to one folder)."""


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError, ValueError):  # alive and someone else's, or no pid at all
        return False
    return False


def _old(p: Path) -> bool:
    try:
        return time.time() - p.lstat().st_mtime > STALE_AFTER_S
    except OSError:
        return False


def remove_stale_partials(target: Path) -> None:
    """Remove the hidden leftovers of earlier writes of ``target`` whose process (on this host) is gone."""
    name = re.compile(rf"{re.escape(PARTIAL_PREFIX)}(?:old-)?{re.escape(target.name)}-[0-9a-f]{{8}}"
                      rf"-pid(\d+)@{re.escape(socket.gethostname())}")
    with contextlib.suppress(OSError):
        for c in target.parent.iterdir():
            m = name.fullmatch(c.name)
            if m and int(m.group(1)) != os.getpid() and _old(c) and _process_gone(int(m.group(1))):
                _remove(c)


def written_by_d3ip(path: Path) -> bool:
    """Whether ``path`` is a DICOM file d3ip wrote (its ``SoftwareVersions`` or the file meta's
    implementation version name says so). ``--overwrite`` replaces a folder only when every file
    in it is one of these, so it never deletes a scanner's or a user's files."""
    if not (path.is_file() and path.name.lower().endswith(".dcm")):
        return False
    try:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SoftwareVersions"])
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False
    software = str(ds.get("SoftwareVersions", "") or "")
    impl = str(getattr(getattr(ds, "file_meta", None), "ImplementationVersionName", "") or "")
    return software.lower().startswith("d3ip") or impl.upper().startswith("D3IP")


OS_LITTER = (".DS_Store", "Thumbs.db", "desktop.ini")
"""Files an operating system's file browser leaves in any folder it shows."""


def check_output(path: str | os.PathLike, overwrite: bool = False, inputs: tuple[str | os.PathLike, ...] = (),
                 series: bool = False) -> Path:
    """Fail early (exit 4) when ``path`` exists without ``overwrite``, is one of ``inputs`` (or a
    folder holding one), is a folder holding files d3ip did not write, or its folder is
    unwritable (probed with a real file, so read-only file systems are caught before any work
    is done). With ``series`` (``path`` is a DICOM series folder), it is also refused inside an
    input folder, where it would join the series read from it (so reading that input again would
    fail). Other outputs may go there: the DICOM reader skips them. Beside a single DICOM file
    input, which is read alone, any output may go. An existing empty folder is accepted only
    for a ``series`` (users ``mkdir`` a series folder first); at a file output it is refused like
    any existing path, before any work."""
    p = Path(path)
    for src in inputs:
        src_r, p_r = Path(src).resolve(), p.resolve()
        if src_r == p_r or p_r in src_r.parents:
            raise OutputError(f"output {p} would replace the input {src}; give another output name")
        if series and src_r.is_dir() and src_r in p_r.parents:
            raise OutputError(f"output {p} lies inside the input's DICOM series folder {src}, where its files would "
                              "join that series; give an output outside it")
    if p.exists() and not overwrite and not (series and _empty_dir(p)):
        raise OutputError(f"output {p} exists (use --overwrite to replace it)")
    if p.is_dir() and not p.is_symlink():
        foreign = [c.name for c in p.iterdir() if c.name not in OS_LITTER and not written_by_d3ip(c)]
        if foreign:
            raise OutputError(f"output {p} is a folder holding files d3ip did not write ({', '.join(sorted(foreign)[:3])}"
                              f"{', ...' if len(foreign) > 3 else ''}); not replacing it, even with --overwrite")
    parent = p.parent if str(p.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise OutputError(f"output folder {parent} is a file, not a folder")
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create output folder {parent}: {exc.strerror or exc}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {parent} is not writable")
    probe = parent / f"{PARTIAL_PREFIX}probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"cannot write in output folder {parent}: {os_error_text(exc)}") from None
    return p


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; move it onto ``path`` when the block succeeds.

    With ``directory=True`` the temporary path is an (empty, created) directory.
    On any exception the temporary file or directory is removed and nothing is left.
    """
    target = check_output(path, overwrite, series=directory)
    remove_stale_partials(target)
    tmp = partial_path("", target)
    try:
        if directory:
            tmp.mkdir()
        yield tmp
        if target.exists():
            if not overwrite and not (directory and _empty_dir(target)):
                raise OutputError(f"output {target} appeared while writing (use --overwrite)")
            old = partial_path("old-", target)
            os.replace(target, old)
            os.replace(tmp, target)
            _remove(old)
        else:
            os.replace(tmp, target)
    except OSError as exc:
        _remove(tmp)
        raise OutputError(f"cannot write {target}: {os_error_text(exc)}") from None
    except BaseException:
        _remove(tmp)
        raise


def os_error_text(exc: OSError) -> str:
    """One line saying why a write failed: the error's own text, without the traceback that
    some libraries (pydicom's element writer, h5py) fold into the message."""
    text = exc.strerror or str(exc) or type(exc).__name__
    return (text.strip().splitlines() or [type(exc).__name__])[0]


def check_distinct_outputs(named: dict[str, str | os.PathLike | None]) -> None:
    """Refuse (exit 2) two outputs of one run that name the same path, or one inside another
    (``--report`` inside a DICOM ``-o`` folder), before any work: else the second write would
    fail after the run, or silently replace the first. Outputs may lie inside
    ``--checkpoint-dir``, but not in the ``sample<k>`` folders that hold its own files."""
    from d3ip_cli.core.errors import UsageError

    items = [(label, Path(p).resolve()) for label, p in named.items() if p is not None]
    for i, (a, pa) in enumerate(items):
        for b, pb in items[i + 1:]:
            if pa == pb:
                raise UsageError(f"{a} and {b} name the same path {pa}: give each its own name")
            for (x, px), (y, py) in (((a, pa), (b, pb)), ((b, pb), (a, pa))):
                if px not in py.parents:
                    continue
                if x != "--checkpoint-dir":
                    raise UsageError(f"{y} ({py}) lies inside {x} ({px}): give each its own place")
                if _checkpoint_folder(py.relative_to(px).parts[0]):
                    raise UsageError(f"{y} ({py}) lies inside {px / py.relative_to(px).parts[0]}, where --checkpoint-dir "
                                     "keeps its sampler states: give it another place")


def _checkpoint_folder(name: str) -> bool:
    """``sample0`` (and ``sample1``, ... of older versions, one per posterior sample): the folders
    :class:`~d3ip_cli.engine.checkpointing.Checkpointer` keeps a run's sampler states in."""
    return name.startswith("sample") and name[len("sample"):].isdigit()


def remove_outputs(record: Any) -> None:
    """Remove every output that ``record`` lists (a run that failed before it finished), and the
    sidecar an output's writer may have put beside it (``.npy`` geometry)."""
    for entry in list(record["outputs"]):
        _remove(Path(entry["path"]))
        if entry.get("role") == "output":
            _remove(sidecar_path(entry["path"]))
    record["outputs"].clear()


def _empty_dir(p: Path) -> bool:
    """A real folder holding nothing (but OS litter): safe to write a folder output into, as
    users who ``mkdir`` first expect."""
    return p.is_dir() and not p.is_symlink() and all(c.name in OS_LITTER for c in p.iterdir())


def _remove(p: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink()


def write_json(path: str | os.PathLike, doc: Any, overwrite: bool = True) -> Path:
    """Write ``doc`` as indented JSON atomically."""
    with atomic_output(path, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")
    return Path(path)


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def sidecar_path(output: str | os.PathLike) -> Path:
    """``scan.nii.gz`` -> ``scan.nii.gz.json``; ``series_dir`` -> ``series_dir.json``."""
    p = Path(output)
    return p.parent / (p.name.rstrip("/") + ".json")
