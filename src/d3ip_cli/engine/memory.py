"""Memory planning (DESIGN §6): slice chunks sized from free memory; clear refusals.

Everything the engine keeps per slice (the sampler state, the measurement, the initial
estimate, CG temporaries) grows linearly with the number of slices; network activations
depend only on the chunk of slices evaluated at once. :func:`plan` sizes that chunk from
the device's free memory and refuses, *before* any work, a volume that cannot fit,
saying how many slices would (exit 5).

``D3IP_MEMORY_LIMIT_GB=N`` limits the memory d3ip plans for to ``N`` GiB (when less is
free, the free amount counts): to share a node with other jobs, or to see what a smaller
device would take. Under ``torchrun`` each rank plans for its own shard of slices.

Peak memory is reported in the run record: ``peak_memory_mb`` (resident memory of the
process) and, on CUDA, ``peak_device_memory_mb``; ``scripts/bench_memory.py`` measures
its growth with the number of slices.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from d3ip_cli.core.errors import ResourceError, UsageError

GiB = 1024**3
LIMIT_ENV = "D3IP_MEMORY_LIMIT_GB"


def memory_limit() -> int | None:
    """``D3IP_MEMORY_LIMIT_GB`` in bytes, or ``None`` when unset."""
    raw = os.environ.get(LIMIT_ENV, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value != value or value == float("inf"):
        raise UsageError(f"{LIMIT_ENV}={raw!r}: expected a positive number of GiB")
    return int(value * GiB)


def available_bytes(device: torch.device) -> int:
    """Free memory on ``device`` (capped by ``D3IP_MEMORY_LIMIT_GB``)."""
    free = _free_bytes(device)
    limit = memory_limit()
    return free if limit is None else min(free, limit)


def _free_bytes(device: torch.device) -> int:
    """CUDA's free memory, or ``MemAvailable`` on Linux CPUs."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * GiB


@dataclass
class MemoryPlan:
    chunk: int
    per_slice_bytes: int
    per_image_activation_bytes: int
    fixed_bytes: int
    available_bytes: int
    max_slices: int

    def to_dict(self) -> dict:
        return {"chunk": self.chunk, "per_slice_mb": round(self.per_slice_bytes / 2**20, 2),
                "activation_per_image_mb": round(self.per_image_activation_bytes / 2**20, 2),
                "available_gb": round(self.available_bytes / GiB, 2), "max_slices": self.max_slices}


def plan(n_slices: int, image_shape: tuple[int, int], meas_numel_per_slice: int, *, model_channels: int,
         complex_: bool, adapt_batch: int, device: torch.device, n_samples: int = 1,
         available: int | None = None, budget_fraction: float = 0.7, ranks: int = 1) -> MemoryPlan:
    """Choose the network chunk and check that ``n_slices`` fit.

    The estimates are deliberately conservative: ~14 image-sized float32 buffers per
    slice (state, estimates, CG vectors), 4 measurement-sized buffers, activations of
    ~24 feature maps of ``model_channels`` per evaluated image (x3 with gradients, for the
    ``adapt_batch`` slices of an adaptation step), plus the network itself.
    Under ``torchrun``, ``n_slices`` is one rank's shard and ``ranks`` the number of ranks:
    every rank also holds the whole volume's measurement, initial estimate and reference
    (~4 image- and 2 measurement-sized buffers per slice of the volume), and the refusal
    names the slices that fit per rank and in all.
    """
    h, w = image_shape
    cplx = 2 if complex_ else 1
    per_slice = (14 * h * w + 4 * meas_numel_per_slice) * 4 * cplx * max(1, n_samples)
    if ranks > 1:  # this rank's share of slices, plus its copy of the whole problem
        per_slice += ranks * (4 * h * w + 2 * meas_numel_per_slice) * 4 * cplx
    act = 24 * model_channels * h * w * 4
    fixed = 3 * act * adapt_batch * cplx + 256 * 2**20
    avail = available_bytes(device) if available is None else int(available)
    budget = int(avail * budget_fraction)
    max_slices = max(0, (budget - fixed - act) // per_slice)
    if n_slices > max_slices:
        need = (n_slices * per_slice + fixed + act) / GiB / budget_fraction  # free memory, with the safety margin
        where = f"{avail / GiB:.2f} GiB is free on {device}"
        if memory_limit() is not None and avail == memory_limit():
            where = f"d3ip may use {avail / GiB:.2f} GiB ({LIMIT_ENV})"
        if ranks > 1:
            what = (f"{n_slices} slices of {h}x{w} per rank need about {need:.2f} GiB free but {where}; at most "
                    f"{max_slices} slices fit per rank, {max_slices * ranks} with {ranks} ranks")
        else:
            what = f"{n_slices} slices of {h}x{w} need about {need:.2f} GiB free but {where}; at most {max_slices} slices fit"
        if max_slices == 0:
            hint = (f"even one slice needs about {(per_slice + fixed + act) / GiB / budget_fraction:.2f} GiB free "
                    "(the network and its activations; a smaller --grid needs less)")
        else:
            hint = "use --slices A:B to reconstruct a slab at a time, a smaller --grid, or more ranks (torchrun)"
        if n_samples > 1:
            hint += f"; --samples {n_samples} holds {n_samples} copies of every slice (fewer samples need less)"
        raise ResourceError(f"{what}: {hint}")
    room = budget - fixed - n_slices * per_slice
    chunk = int(max(1, min(64, room // act, n_slices * cplx * max(1, n_samples))))  # the chains are rows too
    return MemoryPlan(chunk, per_slice, act, fixed, avail, int(max_slices))
