"""The method registry behind ``d3ip reconstruct --method NAME``.

Every method has one signature::

    fn(op, y, x_init, ctx) -> torch.Tensor          # [Z, H, W], real or complex

- ``op``: the :class:`~d3ip_cli.physics.base.LinearOperator` of the task (on ``ctx.device``);
- ``y``: the measurement (normalised intensity scale, see :mod:`d3ip_cli.engine.intensity`);
- ``x_init``: the classical initial estimate ``op.pinv(y)`` (FBP or zero-filled);
- ``ctx``: a :class:`MethodContext` (device, seeded generator, progress callback, method
  parameters, run record, prior path, preset, samples, checkpointing).

Classical baselines (:data:`d3ip_cli.baselines.BASELINES`) are registered here on import.
Diffusion methods register themselves with :func:`register_method`::

    from d3ip_cli.engine.methods import register_method
    register_method("d3ip", run_d3ip, tasks={"sparse-view", "limited-angle", "cs-mri"},
                    needs_prior=True, description="...", defaults={...})

and the module that does so is listed in :data:`METHOD_MODULES`, which :func:`get_method`
imports on first use (so the CLI never has to know about it). Until a name from
:data:`PLANNED_METHODS` is registered, asking for it raises
:class:`~d3ip_cli.core.errors.MissingComponentError` (exit 6) with a clear message.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Iterable

import torch

from d3ip_cli.core.errors import MissingComponentError, UsageError

Progress = Callable[[int, int, dict], None]
MethodFn = Callable[[Any, torch.Tensor, torch.Tensor, "MethodContext"], torch.Tensor]

ALL_TASKS = frozenset({"sparse-view", "limited-angle", "cs-mri"})

PLANNED_METHODS: dict[str, str] = {
    "dds": "diffusion prior with CG data consistency, no adaptation",
    "ddip": "per-slice test-time adaptation (2D baseline)",
    "d3ip": "shared LoRA adapter adapted at test time (the default)",
    "d3ip-mbir": "D3IP with ADMM-TV along z data consistency",
    "d3ip-meta": "Reptile meta-learned shared adapter, then per-slice fine-tuning",
}
"""Diffusion methods the engine will provide; named here so the CLI can say they are coming."""

METHOD_MODULES: list[str] = ["d3ip_cli.engine.diffusion"]
"""Modules imported (if present) before a lookup; each calls :func:`register_method` on import.
REGISTRATION POINT for the diffusion engine: add its module here."""


@dataclasses.dataclass
class MethodContext:
    """Everything a method may need besides the operator and data."""

    device: torch.device
    generator: torch.Generator
    seed: int = 0
    task: str | None = None
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    progress: Progress | None = None
    record: Any = None
    prior: str | None = None
    preset: str | None = None
    samples: int = 1
    checkpoint_dir: str | None = None
    resume: bool = False
    noise: dict[str, Any] | None = None
    """The data's noise record in the units of ``y`` (``None``: unknown)."""

    def report(self, step: int, total: int, **info: Any) -> None:
        """Forward progress to the callback, if any."""
        if self.progress is not None:
            self.progress(step, total, info)


@dataclasses.dataclass(frozen=True)
class Method:
    """A registered method."""

    name: str
    fn: MethodFn
    tasks: frozenset[str]
    needs_prior: bool
    description: str = ""
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def classical(self) -> bool:
        return not self.needs_prior


METHODS: dict[str, Method] = {}


def register_method(name: str, fn: MethodFn, tasks: Iterable[str] = ALL_TASKS, *, needs_prior: bool = True,
                    description: str = "", defaults: dict[str, Any] | None = None, replace: bool = False) -> Method:
    """Register ``fn(op, y, x_init, ctx) -> x`` under ``name`` for ``tasks``.

    ``needs_prior`` marks diffusion methods (the run record then carries the prior's
    SHA-256). ``defaults`` lists the parameters the method accepts (``ctx.params`` is
    checked against them). Registering a taken name needs ``replace=True``.
    """
    name = name.strip().lower()
    if name in METHODS and not replace:
        raise ValueError(f"method {name!r} is already registered")
    unknown = set(tasks) - ALL_TASKS
    if unknown:
        raise ValueError(f"method {name!r}: unknown task(s) {sorted(unknown)}")
    m = Method(name, fn, frozenset(tasks), needs_prior, description, dict(defaults or {}))
    METHODS[name] = m
    return m


def _load_modules() -> None:
    for mod in METHOD_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise


def available_methods(task: str | None = None) -> list[str]:
    """Registered method names (for ``task`` when given)."""
    _load_modules()
    return sorted(n for n, m in METHODS.items() if task is None or task in m.tasks)


def get_method(name: str, task: str | None = None) -> Method:
    """The registered method ``name``; usage error when unknown or not for ``task``, exit 6 when planned."""
    _load_modules()
    key = (name or "").strip().lower()
    if key not in METHODS:
        if key in PLANNED_METHODS:
            classical = ", ".join(n for n in available_methods(task) if not METHODS[n].needs_prior)
            raise MissingComponentError(
                f"method {key} ({PLANNED_METHODS[key]}) is not available in this version yet; "
                f"classical methods available: {classical}")
        raise UsageError(f"unknown method {name!r}: choose one of "
                         f"{', '.join(sorted(set(METHODS) | set(PLANNED_METHODS)))}")
    m = METHODS[key]
    if task is not None and task not in m.tasks:
        raise UsageError(f"method {key} does not apply to task {task} (it supports {', '.join(sorted(m.tasks))})")
    return m


def check_params(method: Method, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` merged over the method defaults; unknown parameters are a usage error."""
    unknown = set(params) - set(method.defaults)
    if unknown:
        opts = ", ".join("--" + k.replace("_", "-") for k in sorted(unknown))
        raise UsageError(f"{opts} {'does' if len(unknown) == 1 else 'do'} not apply to method {method.name}")
    return {**method.defaults, **params}


def _baseline_method(b: Any) -> MethodFn:
    def run(op: Any, y: torch.Tensor, x_init: torch.Tensor | None, ctx: MethodContext) -> torch.Tensor:
        params = check_params(METHODS[b.name], ctx.params)
        if b.warm_start and x_init is not None:
            params.setdefault("x0", x_init)
        return b.fn(op, y, generator=ctx.generator, progress=ctx.progress, **params)

    run.__name__ = f"baseline_{b.name.replace('-', '_')}"
    run.__doc__ = b.fn.__doc__
    return run


def _register_baselines() -> None:
    from d3ip_cli.baselines import BASELINES

    for b in BASELINES.values():
        register_method(b.name, _baseline_method(b), b.tasks, needs_prior=False, description=b.description,
                        defaults=b.defaults, replace=True)


_register_baselines()
