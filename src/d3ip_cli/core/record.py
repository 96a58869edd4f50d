"""The run record (DESIGN §7): one JSON document per run.

It is written as ``OUTPUT.json`` beside every output and printed by ``--json``. The
record is plain data; :class:`RunRecord` only helps to fill it (timings, hashes,
warnings) and to serialise it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from d3ip_cli import __version__


def sha256_path(path: str | os.PathLike) -> str:
    """SHA-256 of a file, or of a directory's files (sorted by name, names included)."""
    p = Path(path)
    h = hashlib.sha256()
    if p.is_dir():
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            h.update(str(f.relative_to(p)).encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    else:
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux ``ru_maxrss`` is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _torch_version() -> str | None:
    """torch's version without importing it (seconds) when no one has yet."""
    if "torch" in sys.modules:
        return str(sys.modules["torch"].__version__)
    try:
        from importlib.metadata import version

        return version("torch")
    except Exception:  # noqa: BLE001 - not installed / broken metadata
        return None


class RunRecord:
    """Accumulates the run record of one command.

    Required keys (DESIGN §2): ``method``, ``task``, ``output``, ``wall_time_s``,
    ``seed``, ``device``, ``prior_sha256``, ``metrics``. Commands fill what applies.
    """

    def __init__(self, command: str, argv: list[str] | None = None,
                 on_warning: Callable[[str], None] | None = None) -> None:
        self._t0 = time.perf_counter()
        self.on_warning = on_warning  # told of each warning as it is recorded (a CLI says it at once)
        self.doc: dict[str, Any] = {
            "tool": "d3ip",
            "version": __version__,
            "command": command,
            "argv": list(sys.argv if argv is None else argv),
            "python": platform.python_version(),
            "torch": _torch_version(),
            "host": platform.node(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "method": None,
            "task": None,
            "config": {},
            "seed": None,
            "device": "cpu",
            "prior": None,
            "prior_sha256": None,
            "inputs": [],
            "output": None,
            "outputs": [],
            "timings_s": {},
            "wall_time_s": None,
            "peak_memory_mb": None,
            "metrics": None,
            "warnings": [],
        }

    def __setitem__(self, key: str, value: Any) -> None:
        self.doc[key] = value

    def __getitem__(self, key: str) -> Any:
        return self.doc[key]

    def add_input(self, path: str | os.PathLike, role: str = "input") -> None:
        p = Path(path)
        entry = {"role": role, "path": str(p.resolve())}
        with contextlib.suppress(OSError):
            entry["sha256"] = sha256_path(p)
        self.doc["inputs"].append(entry)

    def add_output(self, path: str | os.PathLike, role: str = "output") -> None:
        p = Path(path)
        entry = {"role": role, "path": str(p.resolve())}
        with contextlib.suppress(OSError):
            entry["sha256"] = sha256_path(p)
        self.doc["outputs"].append(entry)
        if role == "output":
            self.doc["output"] = str(p.resolve())
            if p.name.endswith(".npy") and "volume" not in self.doc:
                # Keep the .npy geometry that the writer put in the sidecar this record replaces.
                with contextlib.suppress(OSError, ValueError, AttributeError):
                    volume = json.loads((p.parent / (p.name + ".json")).read_text()).get("volume")
                    if isinstance(volume, dict):
                        self.doc["volume"] = volume

    def warn(self, message: str) -> None:
        self.doc["warnings"].append(message)
        if self.on_warning is not None:
            self.on_warning(message)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage: ``with record.stage("sampling"): ...``."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.doc["timings_s"][name] = round(self.doc["timings_s"].get(name, 0.0) + time.perf_counter() - t, 4)

    def finish(self) -> dict[str, Any]:
        """Stamp wall time and peak memory; return the document."""
        self.doc["wall_time_s"] = round(time.perf_counter() - self._t0, 4)
        mem = self.doc.get("peak_memory_mb")
        self.doc["peak_memory_mb"] = max(mem or 0.0, round(peak_rss_mb(), 1))
        return self.doc
