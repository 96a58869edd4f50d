"""Benchmark suites as data (DESIGN §8): tasks x volumes x methods, and how big to make them.

A :class:`Suite` names task settings (:data:`TASK_SETTINGS`), volumes
(:data:`VOLUMES`) and methods, and lists its cases as ``(task, volume)`` pairs, each
optionally with its own method list (the per-slice methods ``ddip`` and ``d3ip-meta``
are the slow ones). Every case is evaluated on a slab of ``slices`` slices resampled
to ``grid x grid`` in-plane; the regularisation weight of ``tv`` and ``l1-wavelet`` is
tuned on one held-out slice of the same volume over ``tune_grid`` (best PSNR).

========  ===========================================================================
suite     intent
========  ===========================================================================
smoke     seconds: checks the machinery on 3 slices of 32x32 (numbers mean nothing)
quick     a 2-core CPU in under 20 minutes: 4 slices of 64x64, the ``fast`` preset
claims    the engine's quality claims at a CPU user's settings (128x128, ``fast``): a 16-slice
          phantom and 8 slices of the example; 6-10 minutes on a 2-core CPU
standard  a workstation (hours on CPU, minutes on a GPU): 8 slices of 128x128, ``standard``
paper     a GPU: 32 slices of 256x256, the ``paper`` preset, every task on every volume
========  ===========================================================================
"""

from __future__ import annotations

import dataclasses
from typing import Any

ALL_METHODS: tuple[str, ...] = ("fbp", "cgls", "tv", "zero-filled", "l1-wavelet", "dds", "ddip", "d3ip",
                                "d3ip-mbir", "d3ip-meta")
"""Every method the benchmark knows, in table order (classical first)."""

CLASSICAL = ("fbp", "cgls", "tv", "zero-filled", "l1-wavelet")
PER_SLICE = ("ddip", "d3ip-meta")
"""Methods that run the sampler slice by slice (cost grows ~10x faster with slices than d3ip's)."""
FAST_METHODS = tuple(m for m in ALL_METHODS if m not in PER_SLICE)

TUNED = ("tv", "l1-wavelet")
"""Methods whose ``--weight`` is tuned on a held-out slice."""


@dataclasses.dataclass(frozen=True)
class TaskSetting:
    """A task with its options (``ReconConfig`` fields), e.g. sparse-view with 30 views."""

    id: str
    task: str
    options: dict[str, Any]
    label: str


TASK_SETTINGS: dict[str, TaskSetting] = {t.id: t for t in (
    TaskSetting("sv8", "sparse-view", {"views": 8}, "sparse-view, 8 views"),
    TaskSetting("sv30", "sparse-view", {"views": 30}, "sparse-view, 30 views"),
    TaskSetting("la90", "limited-angle", {"arc": 90.0}, "limited-angle, 90 deg arc"),
    TaskSetting("mri4", "cs-mri", {"acceleration": 4.0}, "cs-mri, x4 (uniform1d)"),
    TaskSetting("mri8", "cs-mri", {"acceleration": 8.0}, "cs-mri, x8 (uniform1d)"),
)}


@dataclasses.dataclass(frozen=True)
class VolumeSpec:
    """Where a benchmark volume comes from.

    ``kind``: ``phantom`` (a random 3D ellipsoid phantom from the seed: in distribution),
    ``example`` (the bundled real-anatomy example: out of distribution) or ``file``
    (``--data PATH``: out of distribution unless stated).
    """

    id: str
    kind: str
    label: str
    in_distribution: bool
    path: str | None = None


VOLUMES: dict[str, VolumeSpec] = {v.id: v for v in (
    VolumeSpec("phantom", "phantom", "3D ellipsoid phantom (in distribution)", True),
    VolumeSpec("mni", "example", "MNI152 T1 template, bundled example (out of distribution)", False),
)}


@dataclasses.dataclass(frozen=True)
class CaseSpec:
    """One case of a suite: a task setting on a volume (``volume="*data"``: each ``--data`` volume)."""

    task: str
    volume: str
    methods: tuple[str, ...] | None = None
    """Methods for this case (``None``: the suite's); ``--methods`` overrides both."""
    slices: int | None = None
    """Slab size of this case (``None``: the suite's)."""


@dataclasses.dataclass(frozen=True)
class Suite:
    """A benchmark suite (see the module docstring)."""

    name: str
    description: str
    cases: tuple[CaseSpec, ...]
    methods: tuple[str, ...]
    slices: int
    grid: int
    preset: str
    tune_grid: dict[str, tuple[float, ...]]
    engine: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Engine settings forced for every diffusion run (``ReconConfig`` fields such as ``steps``)."""
    data_methods: tuple[str, ...] | None = None
    """Methods on ``--data`` volumes (``None``: the suite's)."""
    data_tasks: tuple[str, ...] = ("sv30", "mri4")
    """Task settings run on each ``--data`` volume."""
    noise: dict[str, Any] = dataclasses.field(default_factory=lambda: {"noise": "none"})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["cases"] = [dataclasses.asdict(c) for c in self.cases]
        return d


LOG_GRID = (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
"""Regularisation weights tried on the held-out slice (images are normalised to about [0, 1])."""

SUITES: dict[str, Suite] = {s.name: s for s in (
    Suite(
        name="smoke",
        description="machinery check in seconds (3 slices of 32x32, 3 sampling steps); the numbers mean nothing",
        cases=(CaseSpec("sv30", "phantom"), CaseSpec("mri4", "phantom")),
        methods=("fbp", "tv", "zero-filled", "l1-wavelet", "dds", "d3ip"),
        slices=3, grid=32, preset="fast", tune_grid={"tv": (1e-4, 1e-3, 1e-2), "l1-wavelet": (1e-4, 1e-3, 1e-2)},
        engine={"steps": 3, "adapt_iters": 1},
        data_tasks=("sv30",),
    ),
    Suite(
        name="quick",
        description="a 2-core CPU in under 20 minutes: 4 slices of 64x64, fast preset; the slow per-slice "
                    "methods (ddip, d3ip-meta) on the 30-view sparse-view cases only",
        cases=(
            CaseSpec("sv30", "phantom", ALL_METHODS),
            CaseSpec("sv30", "mni", ALL_METHODS),
            CaseSpec("sv8", "mni", FAST_METHODS),
            CaseSpec("la90", "mni", FAST_METHODS),
            CaseSpec("mri4", "mni", ("zero-filled", "cgls", "tv", "l1-wavelet", "dds", "d3ip", "d3ip-mbir")),
            CaseSpec("mri8", "phantom", ("zero-filled", "cgls", "tv", "l1-wavelet", "dds", "d3ip", "d3ip-mbir")),
        ),
        methods=FAST_METHODS,
        slices=4, grid=64, preset="fast", tune_grid={"tv": LOG_GRID, "l1-wavelet": LOG_GRID},
        data_methods=("fbp", "cgls", "tv", "zero-filled", "l1-wavelet", "dds", "d3ip"),
    ),
    Suite(
        name="claims",
        description="the engine's quality claims at a CPU user's settings, 128x128 and the fast preset: "
                    "dds vs tv on a 16-slice phantom (in distribution); d3ip vs dds vs tv/l1-wavelet and "
                    "d3ip-mbir's through-slice error on 8 slices of the bundled example (out of distribution)",
        cases=(
            CaseSpec("sv30", "phantom", ("fbp", "cgls", "tv", "dds", "d3ip"), slices=16),
            CaseSpec("sv30", "mni", ("cgls", "tv", "dds", "d3ip", "d3ip-mbir")),
            CaseSpec("mri4", "mni", ("zero-filled", "tv", "l1-wavelet", "dds", "d3ip", "d3ip-mbir")),
        ),
        methods=FAST_METHODS,
        slices=8, grid=128, preset="fast", tune_grid={"tv": LOG_GRID, "l1-wavelet": LOG_GRID},
        data_methods=("cgls", "tv", "l1-wavelet", "dds", "d3ip", "d3ip-mbir"),
    ),
    Suite(
        name="standard",
        description="every task on the phantom and the bundled example: 8 slices of 128x128, standard preset "
                    "(hours on a CPU, minutes on a GPU)",
        cases=tuple(CaseSpec(t, v) for v in ("phantom", "mni") for t in TASK_SETTINGS),
        methods=ALL_METHODS,
        slices=8, grid=128, preset="standard", tune_grid={"tv": LOG_GRID, "l1-wavelet": LOG_GRID},
        data_tasks=tuple(TASK_SETTINGS),
    ),
    Suite(
        name="paper",
        description="GPU: every task on the phantom and the bundled example, 32 slices of 256x256, paper preset",
        cases=tuple(CaseSpec(t, v) for v in ("phantom", "mni") for t in TASK_SETTINGS),
        methods=ALL_METHODS,
        slices=32, grid=256, preset="paper",
        tune_grid={"tv": LOG_GRID + (3e-2,), "l1-wavelet": LOG_GRID + (3e-2,)},
        data_tasks=tuple(TASK_SETTINGS),
    ),
)}


def get_suite(name: str) -> Suite:
    """The suite called ``name`` (usage error when unknown)."""
    from d3ip_cli.core.errors import UsageError

    key = (name or "").strip().lower()
    if key not in SUITES:
        raise UsageError(f"--suite {name!r}: expected one of {', '.join(s for s in SUITES if s != 'smoke')} "
                         "(or smoke, a seconds-long machinery check)")
    return SUITES[key]


__all__ = ["ALL_METHODS", "CLASSICAL", "PER_SLICE", "TUNED", "TaskSetting", "TASK_SETTINGS", "VolumeSpec", "VOLUMES",
           "CaseSpec", "Suite", "SUITES", "get_suite"]
