r"""Diffusion reconstructions: ``dds``, ``ddip``, ``d3ip``, ``d3ip-mbir``, ``d3ip-meta``.

Every method is the one sampler (:func:`~d3ip_cli.engine.samplers.ddim_sample`) with
injected pieces, never a copied loop:

=============  =================================  ===========================================
method         data consistency (``dc``)          adaptation (``adapt`` hook)
=============  =================================  ===========================================
``dds``        CG on the normal equations         none
``d3ip``       CG                                 one LoRA adapter shared by all slices,
                                                  random minibatches of M slices
``d3ip-mbir``  ADMM with TV along z               shared adapter, contiguous minibatches
``ddip``       CG                                 a fresh adapter per slice (sampler run
                                                  slice by slice): the slow 2D baseline
``d3ip-meta``  CG                                 Reptile-learned adapter initialisation,
                                                  then per-slice fine-tuning
=============  =================================  ===========================================

Adaptation at step :math:`t` (for :math:`t_{min} \le t \le t_{max}`): a fresh AdamW takes
K steps on

.. math:: \mathcal L(\theta) = \tfrac{1}{|B|}\,\| A_B\,\mathrm{CG}_1(\hat x_0(x_t^B;\theta)) - y_B \|^2,

where :math:`B` is a random minibatch of slices and :math:`\mathrm{CG}_1` one
differentiable CG step. Images are in the engine's normalised units (``[0, 1]`` for the
prior); the network sees ``2x - 1``. Complex images (MRI) are handled as separate real
and imaginary images for the real-valued prior.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from typing import Any, Callable

import torch

from d3ip_cli.core.device import PRECISIONS, resolve_precision
from d3ip_cli.core.errors import UsageError
from d3ip_cli.engine import consistency, lora
from d3ip_cli.engine.samplers import ddim_sample, diffuse
from d3ip_cli.physics.base import LinearOperator
from d3ip_cli.physics.noise import NoiseLevel
from d3ip_cli.physics.solvers import cg
from d3ip_cli.prior import schedule

DIFFUSION_METHODS = ("dds", "ddip", "d3ip", "d3ip-mbir", "d3ip-meta")


@dataclasses.dataclass
class DiffusionSettings:
    """Sampler, data-consistency and adaptation settings (see :data:`PRESETS`)."""

    steps: int = 50
    t_start: int = 1000  # steps spread over [0, t_start); < 1000 starts from the diffused initial estimate (CCDF)
    eta: float = 0.85
    dc: str = "cg"  # cg | prox | admm-tv-z
    cg_iter: int = 5
    fit: str = "steps"  # steps: dc as set (cg_iter steps) | noise: CG down to the noise level where it is known
    tau: float = 0.7  # fit = noise: leave tau² of the fittable noise energy (NoiseLevel.target; 1 = discrepancy principle)
    cg_max: int = 50  # fit = noise: the most CG steps per sampling step
    gamma: float = 1.0
    rho: float = 0.5
    lam: float = 0.01
    admm_iter: int = 5
    admm_cg_iter: int = 5
    mbir_start: str = "x0"  # admm-tv-z: x0 (from x̂0, the reference) | fit (from x̂0 fitted down to the noise, fit = noise)
    lora_rank: int = 4
    train_bias: bool = False
    lr: float = 1e-3
    adapt_iters: int = 10
    adapt_batch: int = 3
    adapt_t_min: int = 20
    adapt_t_max: int = 980
    contiguous: bool = False
    adapt_draw: str = "random"  # random: each minibatch drawn alone | cover: a step's K minibatches walk a shuffled pool
    chunk: int = 16
    meta_outer: int = 20
    meta_inner: int = 3
    meta_lr: float = 0.5
    finetune_iters: int | None = None
    clip: float | None = 2.0
    adapt_cg: int = 1
    precision: str = "fp32"  # fp32 | bf16 | auto: the network under bfloat16 autocast (sampling and adaptation)

    def validate(self) -> "DiffusionSettings":
        if not 1 <= self.steps <= 1000:
            raise UsageError(f"--steps must be in [1, 1000], got {self.steps}")
        if not 1 <= self.t_start <= 1000 or self.steps > self.t_start:
            raise UsageError(f"--t-start {self.t_start} with --steps {self.steps}: the steps are spread over "
                             "[0, t_start), so --t-start must be in [--steps, 1000]")
        if not 0.0 <= self.eta <= 1.0:
            raise UsageError(f"--eta must be in [0, 1], got {self.eta}")
        if self.dc not in ("cg", "prox", "admm-tv-z"):
            raise UsageError(f"unknown data consistency {self.dc!r}")
        if self.fit not in ("steps", "noise"):
            raise UsageError(f"--fit {self.fit!r}: expected steps or noise")
        if self.mbir_start not in ("x0", "fit"):
            raise UsageError(f"--mbir-start {self.mbir_start!r}: expected x0 or fit")
        if not self.tau > 0 or self.cg_max < 1:
            raise UsageError(f"--tau must be > 0 and --cg-max >= 1 (got {self.tau}, {self.cg_max})")
        if self.adapt_iters < 0 or self.adapt_batch < 1 or self.lora_rank < 1:
            raise UsageError("adaptation settings must be positive (iterations >= 0, batch >= 1, rank >= 1)")
        if self.adapt_draw not in ("random", "cover"):
            raise UsageError(f"adapt_draw {self.adapt_draw!r}: expected random or cover")
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    # a CPU user's settings: few steps on a truncated trajectory (t_start 60 for CT, 250 for MRI), short
    # adaptation (K = 10 for CT, 15 with rank-16 adapters for sparse-view, 6 with rank 16 for MRI) at a higher rate (3e-3):
    # see PRESET_MODALITY and PRESET_TASK; data consistency
    # fits down to the data's recorded noise (fit = noise, tau = 0.7; where the noise is unknown the
    # modality's fixed steps). Chosen on volumes outside the benchmarks (docs/engine_study.md §14: phantoms
    # 107 and 108, Colin27 96:104 and 60:68) over noise levels: against the fixed steps dds gained on 30-view
    # CT +2.10 / +1.12 dB (photons i0 = 1e4), -0.22 / -0.11 (1e5), +0.17 / +0.03 (1e6) and +1.45 / +0.28
    # without noise (the exact fit), and on 8-coil MRI x4 +2.8 to +8.3 dB at sigma = 0.3-1% and +0.84 / +1.06
    # at 3%, where tau = 0.5 lost 3.2-3.4 dB; the standard and paper presets keep the paper's fixed 5 CG steps
    "fast": {"steps": 20, "t_start": 60, "adapt_iters": 10, "adapt_batch": 2, "lr": 3e-3, "cg_iter": 5,
             "fit": "noise", "tau": 0.7, "meta_outer": 8, "meta_inner": 2, "precision": "auto"},
    # the paper's settings (DDS/D3IP): 50 steps, K = 10, M = 3, 5 CG iterations
    "standard": {"steps": 50, "adapt_iters": 10, "adapt_batch": 3, "cg_iter": 5},
    # the paper's settings plus the reference's bias training (GPU)
    "paper": {"steps": 50, "adapt_iters": 10, "adapt_batch": 3, "cg_iter": 5, "train_bias": True},
}

# Modality defaults: Cartesian A^H A is a projection, so one CG step already fits y exactly and
# the adaptation loss would carry no signal; MRI adapts on A x̂0 directly, with the proximal DC.
# d3ip-mbir's TV-along-z weight λ (the reference's 0.01), chosen per modality on volumes outside the
# benchmarks (docs/engine_study.md §9: Colin27 slabs 96:104 and 60:68 and the held-out phantom):
# MRI 0.003, where dds with the ADMM step gave 30.66 / 30.47 / 31.56 dB (cs-mri x4) against
# 28.91 / 29.79 / 29.29 at 0.01; CT 0.03, where d3ip-mbir gave 31.31 / 29.74 / 39.78 dB (30-view)
# against 31.21 / 29.44 / 38.60 at 0.01 (0.1 is better on Colin27 but 0.93 dB worse on the phantom).
#
# Where the noise is unknown (and in the standard and paper presets) MRI keeps the reference's proximal
# step (gamma = 10, 5 CG steps) although it leaves multi-coil data under-fit (the fast preset's fit = noise
# replaces it where the data record their noise, §14): on 8-coil cs-mri x4 of Colin27 (docs/engine_study.md §13) the exact fit (CG on the normal
# equations, 50 steps) lifts dds from 28.56 to 41.13 dB without noise, but with complex noise of 1% of
# the data's RMS it falls to 23.11 dB (the proximal step: 28.52), and 20 steps win at 1% and lose at 3%:
# how far to fit depends on the noise. High-SNR multi-coil data: --gamma 1000 --cg-iter 50 (38.00 dB).
MODALITY_DEFAULTS: dict[str, dict[str, Any]] = {
    "CT": {"lam": 0.03},
    "MR": {"dc": "prox", "adapt_cg": 0, "gamma": 10.0, "lam": 0.003},
}

# A preset's settings for one modality. On Colin27 (8 slices of 128², not the benchmark's example;
# docs/engine_study.md §5), K = 3 -> 6 adds +0.4 dB to d3ip on 30-view CT but +0.08 dB on
# cs-mri x4, where each slice is two images (real, imaginary) and K = 6 would then have taken 8
# slices to an estimated 110-116 s, too close to the fast preset's two minutes for 0.08 dB (the
# whole trajectory, fixed CG steps; with today's low start and exact fit it gains more, below).
# With the low start below, CT's K went 6 -> 10 (session 10, §10): +0.71 / -0.05 dB on two
# held-out phantoms and +0.28 / +0.21 dB on two Colin27 slabs (30-view CT), mean +0.29 dB.
#
# The fast preset's 20 steps start at t_start (Come-Closer-Diffuse-Faster, Chung et al. 2022: the
# initial estimate diffused to t_start, all steps at low noise) instead of pure noise. Chosen on
# volumes outside the benchmarks (docs/engine_study.md §7: a held-out phantom, seed 107, and
# Colin27): for CT, 60 gave dds +5.7 / +0.9 dB and d3ip +2.7 dB (Colin27) over the full
# trajectory on 30-view CT, and +0.7 / +0.8 dB on limited-angle; for cs-mri x4 on Colin27, 250
# gave d3ip +1.5 dB where 100 and 60 gave +0.3 / -0.4. With the truncated start only the steps at
# t >= 20 adapt (13 of 20 for CT), so the preset takes AdamW's rate from 1e-3 to 3e-3: on Colin27
# d3ip +1.18 dB (30-view CT; 1e-2 gave +0.72), +0.79 dB (cs-mri x4), +0.13 dB (90-degree arc), and
# -0.20 dB on the held-out phantom (docs/study/lr_*.csv).
#
# MRI's shared adapter, session 18 (§18, Colin27 96:104 and 60:68, cs-mri x4, 8 slices of 128²): with
# the exact data fit of noiseless single-coil data (fit = noise), rank 16 and K = 6 gained d3ip
# +1.33 / +1.58 dB over rank 4 and K = 3 (rank 16 alone +0.38 / +0.47, K = 6 alone +1.02 / +0.87)
# and d3ip-mbir +0.36 / +0.21 dB, for about +35 s on 8 slices.
PRESET_MODALITY: dict[tuple[str, str], dict[str, Any]] = {
    ("fast", "MR"): {"adapt_iters": 6, "lora_rank": 16, "t_start": 250},
}

# A preset's settings for one task, where the tasks of a modality want different ones. The fast
# preset's shared adapter on sparse-view CT: rank 16 and K = 15 (from rank 4, K = 10; session 17,
# docs/engine_study.md §15, chosen on volumes outside the benchmarks): d3ip +0.95 / +0.32 dB on the
# held-out phantoms 107 / 108 (16 slices of 128², 30 views) and +0.93 / +0.48 dB on Colin27 96:104 /
# 60:68, for about +30 s. On the 90-degree arc every larger budget lost or tied (rank 16 and K = 15
# there: -0.82 dB on phantom 107, -0.55 / -0.85 dB on Colin27 60:68 / 96:104), so limited-angle
# keeps rank 4 and K = 10.
#
# d3ip-mbir's ADMM step on the 90-degree arc starts from x̂0 fitted down to the noise (mbir_start = fit;
# session 18, §16, held-out volumes): +2.21 dB on phantom 107, +0.58 / +0.63 dB on Colin27 60:68 / 96:104,
# where the 5 x 5 CG steps of the ADMM step alone leave the wedge under-fit. On 30-view CT it was level
# (-0.23 / -0.53 dB on the phantoms, +0.20 / +0.35 on Colin27; -0.08 at i0 = 1e4) and on single-coil
# cs-mri x4 it lost (-0.27 / -0.23 dB on Colin27), so the other tasks keep the reference's start from x̂0.
PRESET_TASK: dict[tuple[str, str], dict[str, Any]] = {
    ("fast", "sparse-view"): {"adapt_iters": 15, "lora_rank": 16},
    ("fast", "limited-angle"): {"mbir_start": "fit"},
}

METHOD_OVERRIDES: dict[str, dict[str, Any]] = {
    "dds": {"adapt_iters": 0},
    "d3ip-mbir": {"dc": "admm-tv-z", "contiguous": True},
}


# Options a method never takes, refused on the command line: dds does not adapt; only d3ip-mbir has the
# ADMM-TV-z step; only d3ip-meta the Reptile outer loop. (Options whose use depends on the data, such as
# --gamma or --tau, are warned about when they go unused instead.)
ADAPTATION_OPTIONS = ("lr", "adapt_iters", "adapt_batch", "lora_rank", "train_bias", "adapt_t_min", "adapt_t_max",
                      "adapt_draw", "adapt_cg", "adapter", "save_adapter")
MBIR_OPTIONS = ("lam", "rho", "admm_iter", "admm_cg_iter", "mbir_start")
META_OPTIONS = ("meta_outer", "meta_inner", "meta_lr", "finetune_iters")
METHOD_REFUSES: dict[str, tuple[str, ...]] = {
    "dds": ADAPTATION_OPTIONS + MBIR_OPTIONS + META_OPTIONS,
    "d3ip": MBIR_OPTIONS + META_OPTIONS,
    "ddip": MBIR_OPTIONS + META_OPTIONS,
    "d3ip-mbir": META_OPTIONS,
    "d3ip-meta": MBIR_OPTIONS,
}


def settings_for(method: str, preset: str = "fast", task_modality: str = "CT", task: str | None = None,
                 **overrides: Any) -> DiffusionSettings:
    """Resolve preset -> modality defaults -> preset-per-modality -> preset-per-task -> method defaults
    -> explicit overrides (``task``: ``sparse-view``, ``limited-angle``, ``cs-mri``; ``None`` skips
    the per-task step)."""
    if preset not in PRESETS:
        raise UsageError(f"--preset {preset!r}: expected one of {', '.join(PRESETS)}")
    if method not in DIFFUSION_METHODS:
        raise UsageError(f"{method!r} is not a diffusion method ({', '.join(DIFFUSION_METHODS)})")
    values: dict[str, Any] = dict(PRESETS[preset])
    values.update(MODALITY_DEFAULTS.get(task_modality, {}))
    values.update(PRESET_MODALITY.get((preset, task_modality), {}))
    values.update(PRESET_TASK.get((preset, task or ""), {}))
    values.update(METHOD_OVERRIDES.get(method, {}))
    given = {k: v for k, v in overrides.items() if v is not None}
    values.update(given)
    if "t_start" not in given and values.get("steps", 50) > values.get("t_start", 1000):
        raise UsageError(f"--steps {values['steps']} is more than the {preset} preset's --t-start {values['t_start']} "
                         "(the steps are spread over [0, t_start)): give --t-start too (1000 = from pure noise)")
    s = DiffusionSettings(**values).validate()
    if method != "dds" and s.adapt_iters > 0:
        ts = schedule.ddim_timesteps(s.steps, t_start=s.t_start)
        if not any(s.adapt_t_min <= t <= s.adapt_t_max for t in ts):
            raise UsageError(f"--t-start {s.t_start} with --steps {s.steps} visits no step with t >= {s.adapt_t_min}, "
                             f"where {method} adapts: it would run as dds; raise --t-start")
    return s


# ---------------------------------------------------------------------------------------
# image <-> network state
# ---------------------------------------------------------------------------------------


class StateMap:
    """Maps normalised images ``[Z, H, W]`` (real or complex) to the network's ``[N, 1, H, W]``.

    Real images: ``N = Z``; complex images: ``N = 2Z`` (real parts, then imaginary parts).
    """

    def __init__(self, n_slices: int, complex_: bool) -> None:
        self.z = n_slices
        self.complex = complex_

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.cat([idx, idx + self.z]) if self.complex else idx

    def to_state(self, img: torch.Tensor) -> torch.Tensor:
        parts = torch.cat([img.real, img.imag], 0) if self.complex else img
        return (2 * parts - 1).unsqueeze(1)

    def to_image(self, state: torch.Tensor) -> torch.Tensor:
        v = (state[:, 0] + 1) / 2
        if self.complex:
            n = v.shape[0] // 2
            return torch.complex(v[:n], v[n:])
        return v


class Autocast(torch.nn.Module):
    """Runs ``inner`` under bfloat16 autocast and returns float32 (``enabled=False``: a pass-through).

    Only the network's convolutions and matrix products run in bfloat16; the sampler's
    arithmetic, the data consistency and the adapter's AdamW stay in float32. Holds no
    parameters of its own, so adapters are read from and written to ``inner``.
    """

    def __init__(self, inner: torch.nn.Module, enabled: bool) -> None:
        super().__init__()
        self.inner = inner
        self.enabled = enabled

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.inner(x, t)
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            out = self.inner(x, t)
        return out.to(x.dtype)


def make_eps_model(model: torch.nn.Module, chunk: int) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """``eps(x [N,1,H,W], t)`` evaluated in slice chunks (memory grows with the chunk, not N)."""

    def eps(x: torch.Tensor, t: int) -> torch.Tensor:
        out = []
        for s in range(0, x.shape[0], chunk):
            xs = x[s:s + chunk]
            out.append(model(xs, torch.full((xs.shape[0],), t, device=x.device, dtype=torch.long)))
        return torch.cat(out, 0)

    return eps


def fits_noise(s: DiffusionSettings, noise: NoiseLevel | None) -> bool:
    """Whether data consistency fits down to the data's noise: ``fit = "noise"``, the noise known, and a
    CG or proximal step, or the ADMM-TV-z step with ``mbir_start = "fit"`` (its ADMM step then starts
    from the fitted estimate)."""
    wants = s.dc in ("cg", "prox") or (s.dc == "admm-tv-z" and s.mbir_start == "fit")
    return s.fit == "noise" and noise is not None and wants


def make_dc(op: LinearOperator, y: torch.Tensor, smap: StateMap, s: DiffusionSettings,
            noise: NoiseLevel | None = None, chains: int = 1) -> Callable:
    """The data-consistency hook on network states, from the settings.

    ``noise`` (:class:`~d3ip_cli.physics.noise.NoiseLevel`, ``None`` when unknown): with ``fit =
    "noise"`` the CG and proximal steps become :func:`~d3ip_cli.engine.consistency.discrepancy_dc`,
    stopped at ``noise.target(H·W, tau)``; with ``mbir_start = "fit"`` the ADMM-TV-z step starts from
    that fit. ``chains``: the slices are that many stacked copies of the volume (the chains of
    ``--samples``); no step couples one copy to another (CG takes step sizes per copy; TV along z stays
    within each).
    """
    stages: list[Callable[[torch.Tensor], torch.Tensor]] = []  # each slice's fit, then the coupling of slices
    if fits_noise(s, noise):
        unknowns = int(op.in_shape[-1]) * int(op.in_shape[-2])
        stages.append(consistency.discrepancy_dc(op, y, noise.target(unknowns, s.tau), s.cg_max))
    elif s.dc == "cg":
        stages.append(consistency.cg_dc(op, y, s.cg_iter, chains))
    elif s.dc == "prox":
        stages.append(consistency.prox_dc(op, y, s.gamma, s.cg_iter, chains))
    if s.dc == "admm-tv-z":
        stages.append(consistency.admm_tv_z_dc(op, y, rho=s.rho, lam=s.lam, n_admm=s.admm_iter, n_cg=s.admm_cg_iter,
                                               groups=chains))

    def img_dc(x: torch.Tensor) -> torch.Tensor:
        for stage in stages:
            x = stage(x)
        return x

    def dc(x0: torch.Tensor, t: int) -> torch.Tensor:
        if s.clip is not None:  # a poor ε̂ at large t can make x̂0 explode; keep it in a sane range
            x0 = x0.clamp(-s.clip, s.clip)
        return smap.to_state(img_dc(smap.to_image(x0)))

    return dc


# ---------------------------------------------------------------------------------------
# adaptation
# ---------------------------------------------------------------------------------------


def _pick(pool: torch.Tensor, m: int, contiguous: bool, generator: torch.Generator) -> torch.Tensor:
    n = pool.numel()
    m = min(m, n)
    if contiguous:
        start = int(torch.randint(0, n - m + 1, (1,), generator=generator, device=generator.device))
        return pool[start:start + m]
    return pool[torch.randperm(n, generator=generator, device=generator.device)[:m].to(pool.device)].sort().values


def _minibatches(pool: torch.Tensor, m: int, k: int, contiguous: bool, draw: str,
                 generator: torch.Generator) -> list[torch.Tensor]:
    """The ``k`` minibatches of ``m`` slices for one adapted step.

    ``random`` draws each alone (the reference's way); ``cover`` walks shuffled passes over the
    pool (over the block starts when ``contiguous``), so a step's batches visit every slice
    before any slice twice.
    """
    if draw == "random":
        return [_pick(pool, m, contiguous, generator) for _ in range(k)]
    n = pool.numel()
    m = min(m, n)
    units = n - m + 1 if contiguous else n

    def shuffled() -> list[int]:
        return torch.randperm(units, generator=generator, device=generator.device).tolist()

    order: list[int] = []
    out = []
    for _ in range(k):
        if contiguous:
            if not order:
                order = shuffled()
            start = order.pop(0)
            out.append(pool[start:start + m])
            continue
        batch: list[int] = []
        while len(batch) < m:
            if not order:  # a new pass; slices already in this batch go to its end
                new = shuffled()
                order = [i for i in new if i not in batch] + [i for i in new if i in batch]
            batch.append(order.pop(0))
        out.append(pool[torch.tensor(sorted(batch), device=pool.device)])
    return out


def adaptation_loss(model: torch.nn.Module, op: LinearOperator, y: torch.Tensor, smap: StateMap, x: torch.Tensor,
                    idx: torch.Tensor, t: int, abar: torch.Tensor, n_cg: int = 1) -> torch.Tensor:
    r"""``‖A_B CG_n(x̂0(x_t^B; θ)) − y_B‖² / |B|`` for slices ``idx`` (differentiable in θ; ``n_cg = 0``
    uses ``x̂0`` itself)."""
    sub = op.select(idx.tolist())
    yb = y[idx]
    rows = smap.rows(idx)
    xt = x[rows]
    a = float(abar[t])
    eps = model(xt, torch.full((xt.shape[0],), t, device=xt.device, dtype=torch.long))
    x0 = (xt - (1 - a) ** 0.5 * eps) / a**0.5
    part = StateMap(len(idx), smap.complex)
    img = part.to_image(x0)
    rhs = sub.A_adjoint(yb)
    x1 = img.to(rhs.dtype) if rhs.is_complex() else img
    if n_cg > 0:
        x1 = cg(sub.normal, rhs, x0=x1, n_iter=n_cg)
    r = sub.A(x1) - yb
    return (r.abs() ** 2).sum() / len(idx)


def make_adapt_hook(model: torch.nn.Module, params: list[torch.nn.Parameter], op: LinearOperator, y: torch.Tensor,
                    smap: StateMap, s: DiffusionSettings, abar: torch.Tensor, generator: torch.Generator,
                    pool: torch.Tensor, iters: int | None = None, stats: dict | None = None,
                    sync: bool = False, chains: int = 1) -> Callable | None:
    """The D3IP adaptation hook: K AdamW steps on random slice minibatches from ``pool``.

    With ``sync`` (a shared adapter under torchrun) gradients are averaged across ranks. With
    ``chains`` > 1 the state holds that many samples of the volume (``op`` and ``y`` repeat the
    slices ``chains`` times): a minibatch still takes M slices, each from a chain drawn at random
    (a contiguous block from one chain), so the cost of adaptation does not grow with the samples.
    """
    from d3ip_cli.engine.distributed import average_gradients

    k = s.adapt_iters if iters is None else iters
    if k <= 0 or not params:
        return None
    z_chain = op.in_shape[0] // chains

    def rows_of(idx: torch.Tensor) -> torch.Tensor:
        if chains == 1:
            return idx
        n = 1 if s.contiguous else idx.numel()
        c = torch.randint(0, chains, (n,), generator=generator, device=generator.device).to(idx.device)
        return idx + z_chain * c

    def adapt(x: torch.Tensor, t: int) -> None:
        if not s.adapt_t_min <= t <= s.adapt_t_max:
            return
        opt = torch.optim.AdamW(params, lr=s.lr)
        with torch.enable_grad():
            for idx in _minibatches(pool, s.adapt_batch, k, s.contiguous, s.adapt_draw, generator):
                idx = rows_of(idx)
                loss = adaptation_loss(model, op, y, smap, x, idx, t, abar, s.adapt_cg)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if sync:
                    average_gradients(params)
                opt.step()
        if stats is not None:
            stats["adapt_loss"] = float(loss.detach())
            stats["adapted_t"] = int(t)  # progress shows the loss only at steps that adapted
            stats["adapt_steps"] = stats.get("adapt_steps", 0) + k
            stats["nfe_adapt"] = stats.get("nfe_adapt", 0) + k * len(smap.rows(idx))

    return adapt


# ---------------------------------------------------------------------------------------
# the methods
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class DiffusionResult:
    """``image``: the reconstruction (the mean of the samples when ``chains`` > 1); ``std``: the samples'
    per-voxel standard deviation (of magnitudes for complex images; ``None`` for one sample)."""

    image: torch.Tensor
    stats: dict[str, Any]
    adapter: dict[str, torch.Tensor] | None
    std: torch.Tensor | None = None


def reconstruct(
    method: str,
    model: torch.nn.Module,
    op: LinearOperator,
    y: torch.Tensor,
    x_init: torch.Tensor,
    settings: DiffusionSettings,
    *,
    generator: torch.Generator,
    progress: Callable[[dict], None] | None = None,
    adapter: dict[str, torch.Tensor] | None = None,
    checkpointer: Any | None = None,
    noise: NoiseLevel | None = None,
    chains: int = 1,
) -> DiffusionResult:
    """Run a diffusion method on ``y = A x`` and return the image in normalised units.

    Args:
        method: one of :data:`DIFFUSION_METHODS`.
        model: the prior's U-Net (a deep copy is adapted; the caller's stays untouched).
        op: the physics operator over all ``Z`` slices.
        y: measurements ``[op.out_shape]`` in normalised units.
        x_init: the initial estimate ``A†y`` ``[Z, H, W]`` (normalised units).
        settings: resolved :class:`DiffusionSettings`.
        generator: the run's seeded generator (noise and minibatches).
        progress: receives ``{"stage", "step", "steps", "adapt_loss", "residual", ...}``.
        adapter: an initial adapter state (``--adapter``) for the LoRA methods.
        checkpointer: a :class:`~d3ip_cli.engine.checkpointing.Checkpointer` (save every few
            steps, resume, stop on signals), or ``None``.
        noise: the data's :class:`~d3ip_cli.physics.noise.NoiseLevel` (``None`` when unknown);
            used by ``fit = "noise"``.
        chains: posterior samples drawn together (``--samples``): the sampler's state holds
            ``chains`` copies of every slice, each with its own noise, under one adapter (shared
            methods) or one adapter per slice (``ddip``, ``d3ip-meta``); the result is their mean
            and standard deviation. Sampling cost grows with ``chains``, adaptation cost does not.

    Under ``torchrun`` each rank reconstructs its shard of slices; the shared adapter's
    gradients are averaged across ranks; rank 0 receives the whole volume (others ``None``).
    Each rank draws its adaptation minibatches from its own shard. ``d3ip-mbir``'s TV along
    z couples slices only within a shard. ``ddip``/``d3ip-meta`` fine-tune per slice, so
    their per-slice adapters are not synchronised (``d3ip-meta``'s Reptile phase is).
    """
    from d3ip_cli.engine import distributed as dist
    from d3ip_cli.engine.checkpointing import rng_tensor, set_rng

    if method not in DIFFUSION_METHODS:
        raise UsageError(f"unknown diffusion method {method!r}")
    s = settings
    dev = x_init.device
    rank, world_size = dist.world()
    z_total = op.in_shape[0]
    if world_size > 1:
        if z_total < world_size:
            raise UsageError(f"{z_total} slice(s) cannot be shared by {world_size} ranks: use at most {z_total} "
                             "processes (--nproc-per-node)")
        sh = dist.shard(z_total, rank, world_size)
        idx = list(range(sh.start, sh.stop))
        op, y, x_init = op.select(idx), y[sh], x_init[sh]
        noise = None if noise is None else noise.select(sh)

    net = copy.deepcopy(model).to(dev).eval()
    params: list[torch.nn.Parameter] = []
    if method != "dds":
        params = lora.inject_lora(net, s.lora_rank, train_bias=s.train_bias, generator=generator)
        if adapter is not None:
            lora.load_adapter_state(net, adapter)
    if world_size > 1:  # identical adapters everywhere, different noise per rank
        generator.manual_seed(generator.initial_seed() + 7919 * (rank + 1))
    shared = method in ("d3ip", "d3ip-mbir", "d3ip-meta")
    # ranks move in lockstep (same steps, all-reduced gradients) only while sampling the
    # whole shard; the per-slice methods' slice loops differ in length between ranks
    lockstep = world_size > 1 and method in ("dds", "d3ip", "d3ip-mbir")
    init_state = lora.adapter_state(net) if params else None
    abar = schedule.alphas_cumprod().to(dev)
    ts = schedule.ddim_timesteps(s.steps, t_start=s.t_start)
    z = op.in_shape[0]
    smap = StateMap(z, x_init.is_complex())
    stats: dict[str, Any] = {"nfe_sample": 0, "adapt_steps": 0, "nfe_adapt": 0}
    saved = checkpointer.load(agree=lockstep) if checkpointer is not None else None
    chunk = s.chunk
    if saved is not None and 0 < int(saved[1].get("chunk", 0)) <= chunk:
        chunk = int(saved[1]["chunk"])  # batches as before (bitwise resume) when they still fit
    # the network as the sampler and the adaptation loss see it (bfloat16 autocast or not)
    fwd = Autocast(net, resolve_precision(s.precision, dev) == "bf16")
    eps_model = make_eps_model(fwd, chunk)

    def snapshot(extra: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(extra, rng=rng_tensor(generator))
        if params:
            out.update({f"adapter.{k}": v for k, v in lora.adapter_state(net).items()})
        return out

    def restore(tensors: dict[str, torch.Tensor]) -> None:
        set_rng(generator, tensors["rng"])
        if params:
            lora.load_adapter_state(net, {k[8:]: v for k, v in tensors.items() if k.startswith("adapter.")})

    def run(sub_op: LinearOperator, y_sub: torch.Tensor, x0_sub: torch.Tensor, pool: torch.Tensor,
            label: str, iters: int | None = None, resumable: bool = True,
            level: NoiseLevel | None = None) -> torch.Tensor:
        """Sample the slices of ``sub_op``; returns ``[chains, Z_sub, H, W]``."""
        zs = sub_op.in_shape[0]
        if chains > 1:  # the chains as stacked copies of the slices
            copies = [i for _ in range(chains) for i in range(zs)]
            sub_op, y_sub, x0_sub = sub_op.select(copies), y_sub[copies], x0_sub[copies]
            level = None if level is None else level.select(copies)
        sm = StateMap(zs * chains, smap.complex)
        dc = make_dc(sub_op, y_sub, sm, s, level, chains)
        adapt = make_adapt_hook(fwd, params, sub_op, y_sub, sm, s, abar, generator, pool, iters, stats,
                                sync=lockstep, chains=chains)
        start = 0
        if resumable and saved is not None and saved[1].get("stage") == "sample":
            tensors, meta = saved
            restore(tensors)
            x = tensors["x"].to(dev)
            start = int(meta["step"]) + 1
            stats.update(meta.get("stats", {}))
        else:
            x = diffuse(sm.to_state(x0_sub), ts[0], abar, generator)
        y_norm = float(torch.linalg.vector_norm(y_sub)) or 1.0

        def callback(info: dict) -> None:
            stats["nfe_sample"] += info["x"].shape[0]
            if progress is not None:
                res = float(torch.linalg.vector_norm(sub_op.A(sm.to_image(info["x0_dc"])) - y_sub)) / y_norm
                progress({"stage": label, "step": info["i"] + 1, "steps": len(ts), "t": info["t"],
                          "adapt_loss": stats.get("adapt_loss") if stats.get("adapted_t") == info["t"] else None,
                          "residual": res})
            if checkpointer is not None and resumable and info["i"] + 1 < len(ts):
                state = snapshot({"x": info["x"]})
                meta = {"stage": "sample", "step": info["i"], "stats": dict(stats), "chunk": chunk}
                if (info["i"] + 1) % checkpointer.every == 0:
                    checkpointer.save(state, meta)
                checkpointer.check_stop(state, meta, agree=lockstep)

        out = ddim_sample(eps_model, x, ts, abar, eta=s.eta, dc=dc, adapt=adapt, generator=generator,
                          callback=callback, start=start)
        return sm.to_image(out).unflatten(0, (chains, zs))

    all_slices = torch.arange(z, device="cpu")
    if method in ("dds", "d3ip", "d3ip-mbir"):
        image = run(op, y, x_init, all_slices, method, level=noise)
    else:
        done: list[torch.Tensor] = []
        if saved is not None and saved[1].get("stage") == "slices":
            tensors, meta = saved
            set_rng(generator, tensors["rng"])
            init_state = {k[5:]: v for k, v in tensors.items() if k.startswith("init.")}
            done = list(tensors["done"].to(dev).unbind(0)) if "done" in tensors else []
            stats.update(meta.get("stats", {}))
        elif method == "d3ip-meta":
            _reptile(fwd, params, op, y, x_init, smap, s, abar, generator, stats, progress)
            init_state = lora.adapter_state(net)
        iters = s.finetune_iters if (method == "d3ip-meta" and s.finetune_iters is not None) else None
        for i in range(len(done), z):
            lora.load_adapter_state(net, init_state)
            done.append(run(op.select([i]), y[i:i + 1], x_init[i:i + 1], torch.arange(1),
                            f"{method} slice {i + 1}/{z}", iters, resumable=False,
                            level=None if noise is None else noise.select(slice(i, i + 1)))[:, 0])
            if checkpointer is not None and i + 1 < z:
                state = {"rng": rng_tensor(generator), "done": torch.stack(done, 0)}
                state.update({f"init.{k}": v for k, v in init_state.items()})
                meta = {"stage": "slices", "slice": i, "stats": dict(stats)}
                if (i + 1) % checkpointer.every == 0:
                    checkpointer.save(state, meta)
                checkpointer.check_stop(state, meta)
        image = torch.stack(done, 1)
    std = None
    if chains > 1:
        std = (image.abs() if image.is_complex() else image).std(0, unbiased=True)
    image = image.mean(0)
    adapter_out = None
    if params and shared:  # d3ip-meta: the meta-learned initialisation (the per-slice ones are thrown away)
        adapter_out = init_state if method == "d3ip-meta" else lora.adapter_state(net)
    if world_size > 1:
        image = dist.gather_slices(image, z_total)
        std = None if std is None else dist.gather_slices(std, z_total)
        for key in ("nfe_sample", "nfe_adapt"):
            stats[key] = dist.all_reduce_int(int(stats.get(key, 0)), "sum")
    return DiffusionResult(image, stats, adapter_out, std)


def _reptile(net: torch.nn.Module, params: list[torch.nn.Parameter], op: LinearOperator, y: torch.Tensor,
             x_init: torch.Tensor, smap: StateMap, s: DiffusionSettings, abar: torch.Tensor,
             generator: torch.Generator, stats: dict, progress: Callable | None) -> None:
    r"""Reptile (Nichol et al. 2018) over slices: :math:`\theta \leftarrow \theta + \epsilon(\theta'_i - \theta)`
    where :math:`\theta'_i` is ``meta_inner`` AdamW steps of the adaptation loss on slice ``i`` at a random
    noise level, starting from :math:`x_t` = the diffused initial estimate."""
    from d3ip_cli.engine.distributed import average_gradients

    z = op.in_shape[0]
    x_state = smap.to_state(x_init)
    t_hi = min(s.adapt_t_max, schedule.ddim_timesteps(s.steps, t_start=s.t_start)[0])  # levels the sampler visits
    for outer in range(s.meta_outer):
        theta = [p.detach().clone() for p in params]
        i = int(torch.randint(0, z, (1,), generator=generator, device=generator.device))
        t = int(torch.randint(s.adapt_t_min, t_hi + 1, (1,), generator=generator, device=generator.device))
        xt = diffuse(x_state, t, abar, generator)
        opt = torch.optim.AdamW(params, lr=s.lr)
        with torch.enable_grad():
            for _ in range(s.meta_inner):
                loss = adaptation_loss(net, op, y, smap, xt, torch.tensor([i]), t, abar, s.adapt_cg)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                average_gradients(params)
                opt.step()
        with torch.no_grad():
            for p, p0 in zip(params, theta):
                p.copy_(p0 + s.meta_lr * (p - p0))
        stats["adapt_steps"] += s.meta_inner
        stats["nfe_adapt"] += s.meta_inner * len(smap.rows(torch.tensor([i])))
        if progress is not None:
            progress({"stage": "d3ip-meta reptile", "step": outer + 1, "steps": s.meta_outer,
                      "adapt_loss": float(loss.detach()), "residual": None})


# ---------------------------------------------------------------------------------------
# registration with ``reconstruct --method`` (engine.methods)
# ---------------------------------------------------------------------------------------

_PRIOR_CACHE: dict[tuple[str, str], tuple[torch.nn.Module, dict]] = {}

SETTING_FIELDS = {f.name for f in dataclasses.fields(DiffusionSettings)}


ADAPTER_METHODS = ("ddip", "d3ip", "d3ip-mbir", "d3ip-meta")
"""Methods with LoRA adapters (``--adapter`` starts them from a saved one)."""

SHARED_ADAPTER_METHODS = ("d3ip", "d3ip-mbir", "d3ip-meta")
"""Methods that end with one adapter for the whole volume (``--save-adapter``)."""


def check_adapter_options(method: str, adapter: str | None, save_adapter: str | None) -> None:
    """Refuse, before any work, adapter options that a method would silently ignore (exit 2)."""
    if save_adapter and method in DIFFUSION_METHODS and method not in SHARED_ADAPTER_METHODS:
        why = "adapts a fresh adapter per slice" if method == "ddip" else "has no adapter"
        raise UsageError(f"--save-adapter: {method} {why}; the shared adapter comes from "
                         f"{', '.join(SHARED_ADAPTER_METHODS)}")
    if adapter and method == "dds":
        raise UsageError(f"--adapter: dds runs the prior as it is; start {', '.join(ADAPTER_METHODS)} from an adapter")
    if adapter and not os.path.isfile(adapter):
        from d3ip_cli.core.errors import InputDataError

        raise InputDataError(f"--adapter {adapter} does not exist or is not a file")


def load_prior_for(path: str | None, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The prior at ``path`` (default: the bundled one), cached per process."""
    from d3ip_cli.core.errors import MissingComponentError
    from d3ip_cli.prior.checkpoint import bundled_prior_path, load_prior

    p = str(path) if path else str(bundled_prior_path())
    if not path and not bundled_prior_path().exists():
        raise MissingComponentError(f"the bundled prior {p} is missing from this installation; pass --prior PATH "
                                    "(train one with d3ip pretrain-phantom)")
    key = (p, str(device))
    if key not in _PRIOR_CACHE:
        _PRIOR_CACHE[key] = load_prior(p, device)
    return _PRIOR_CACHE[key]


def check_grid_for_prior(prior: str | None, grid: int | None) -> None:
    """``--grid N`` that the prior's downsampling cannot serve is a usage error (exit 2), found
    before any work from the prior's header alone (an unreadable prior is reported later)."""
    from d3ip_cli.prior.checkpoint import bundled_prior_path, read_metadata
    from d3ip_cli.prior.network import UNetConfig

    if not grid:
        return
    try:
        f = UNetConfig.from_dict(read_metadata(prior or bundled_prior_path())["architecture"]).downsampling_factor
    except Exception:  # noqa: BLE001 - the loader gives the real message later
        return
    if grid % f:
        near = sorted({max(f, grid // f * f), -(-grid // f) * f})
        raise UsageError(f"--grid {grid}: the prior needs slice sides divisible by {f} "
                         f"(try --grid {' or '.join(map(str, near))})")


def check_prior_serves(meta: dict, shape: tuple[int, ...], complex_: bool) -> None:
    """Refuse a prior whose channels or downsampling cannot serve ``[Z, H, W]`` images."""
    from d3ip_cli.core.errors import InputDataError
    from d3ip_cli.prior.network import UNetConfig

    cfg = UNetConfig.from_dict(meta["architecture"])
    if cfg.in_channels != 1 or cfg.out_channels != 1:
        raise InputDataError(f"prior {meta.get('path')} has {cfg.in_channels} input channel(s); d3ip needs a "
                             "single-channel (grey-level) prior")
    f = cfg.downsampling_factor
    h, w = shape[-2:]
    if h % f or w % f:
        raise InputDataError(f"the prior cannot serve {h}x{w} slices: sides must be divisible by {f} "
                             f"(an image volume: resample with --grid N, N a multiple of {f}; a measurement file's grid "
                             f"is fixed by its data: simulate it again with such a --grid)")


def run_registered(name: str, op: LinearOperator, y: torch.Tensor, x_init: torch.Tensor, ctx: Any) -> torch.Tensor:
    """``fn(op, y, x_init, ctx)`` for the method registry: prior, settings, memory plan, samples.

    Environment: ``D3IP_MEMORY_LIMIT_GB`` caps the memory the plan counts on (see
    :mod:`d3ip_cli.engine.memory`); ``D3IP_DUMP_ADAPTER=path{rank}.safetensors`` (a test
    hook) makes every rank write its final shared adapter.
    """
    import os

    from d3ip_cli.engine import distributed as dist
    from d3ip_cli.engine.checkpointing import Checkpointer, run_identity
    from d3ip_cli.engine.memory import plan

    dev = ctx.device
    model, meta = load_prior_for(ctx.prior, dev)
    check_prior_serves(meta, tuple(op.in_shape), x_init.is_complex())
    modality = "MR" if getattr(op, "complex_input", False) else "CT"
    overrides = {k: v for k, v in ctx.params.items() if k in SETTING_FIELDS}
    adapter, adapter_meta = None, {}
    if ctx.params.get("adapter"):
        adapter, adapter_meta = lora.read_adapter(ctx.params["adapter"], meta)
    # a reused adapter brings its shape (rank, bias training): above the preset, below explicit options
    shape = {f: adapter_meta[k] for k, f in (("rank", "lora_rank"), ("train_bias", "train_bias"))
             if adapter_meta.get(k) is not None}
    given = {k: v for k, v in overrides.items() if v is not None}
    for key, opt in (("lora_rank", "--lora-rank"), ("train_bias", "--train-bias")):
        if key in shape and key in given and given[key] != shape[key]:
            from d3ip_cli.core.errors import InputDataError

            raise InputDataError(f"{opt} {given[key]} contradicts --adapter {ctx.params['adapter']}, which has "
                                 f"{key.replace('_', ' ')} {shape[key]} (a reused adapter brings its own; leave {opt} out)")
    s = settings_for(name, ctx.preset or "fast", modality, ctx.task, **{**shape, **given})
    if overrides.get("mbir_start") == "fit" and s.fit != "noise":
        raise UsageError(f"--mbir-start fit starts the ADMM step from the fit down to the noise: it needs --fit noise "
                         f"(here --fit {s.fit}{'' if overrides.get('fit') else ', the ' + (ctx.preset or 'fast') + ' preset'})")
    s.precision = resolve_precision(s.precision, dev)  # the record and the checkpoint key name what ran
    rank, world_size = dist.world()
    z, h, w = op.in_shape
    z_rank = -(-z // world_size)  # the largest shard: what one rank holds
    meas_per_slice = int(torch.tensor(op.out_shape[1:]).prod()) if len(op.out_shape) > 1 else 1
    n_samples = max(1, int(ctx.samples or 1))
    mp = plan(z_rank, (h, w), meas_per_slice, model_channels=int(meta["architecture"]["model_channels"]),
              complex_=x_init.is_complex(), adapt_batch=s.adapt_batch, device=dev, n_samples=n_samples,
              ranks=world_size)
    if "chunk" not in overrides:
        s.chunk = mp.chunk
    if adapter is not None:
        made_for = adapter_meta.get("task")
        if made_for and made_for != ctx.task and ctx.record is not None:
            ctx.record.warn(f"--adapter {ctx.params['adapter']} was adapted on --task {made_for} data; this run is "
                            f"--task {ctx.task}")
    from d3ip_cli.physics.noise import noise_level

    level = noise_level(y, ctx.noise, getattr(op, "mask", None) if modality == "MR" else None)
    fits = fits_noise(s, level)
    if ctx.record is not None and rank == 0:  # known before the run: said before it (the CLI prints each as recorded)
        if level is None and s.fit == "noise" and (s.dc != "admm-tv-z" or s.mbir_start == "fit"):
            fixed = (f"its ADMM step ({s.admm_iter} x {s.admm_cg_iter} CG steps) alone" if s.dc == "admm-tv-z" else
                     f"a fixed {s.cg_iter} {'CG' if s.dc == 'cg' else 'proximal CG'} steps")
            ctx.record.warn(f"the data do not record their noise level, so data consistency runs {fixed} instead of "
                            "fitting down to the noise")
        if overrides.get("tau") is not None and not fits:
            ctx.record.warn("--tau is ignored: data consistency runs fixed steps here (--fit steps, data that do not "
                            "record their noise, or d3ip-mbir's ADMM step from x̂0)")
        if s.dc == "admm-tv-z" and s.mbir_start == "fit" and s.fit != "noise":  # the preset's start, --fit steps given
            ctx.record.warn(f"--fit steps: d3ip-mbir's ADMM step starts from x̂0, not from the fit down to the noise "
                            f"that the {ctx.preset or 'fast'} preset's --mbir-start fit asks for on --task {ctx.task}")
        if overrides.get("cg_iter") is not None and s.dc == "admm-tv-z":
            ctx.record.warn(f"--cg-iter is ignored: {name}'s data consistency is its ADMM step "
                            f"({s.admm_iter} x {s.admm_cg_iter} CG steps)")
        for key, opt in (("cg_iter", "--cg-iter"), ("gamma", "--gamma")):
            if fits and s.dc in ("cg", "prox") and overrides.get(key) is not None:
                ctx.record.warn(f"{opt} is ignored: data consistency fits down to the recorded noise level "
                                f"(--fit noise; --fit steps runs the fixed steps)")
        res = int(meta.get("resolution") or 0)
        h, w = (int(v) for v in op.in_shape[-2:])
        if res and not res / 4 <= min(h, w) <= max(h, w) <= 4 * res:
            ctx.record.warn(f"the prior was trained on {res}x{res} phantoms and this grid is {h}x{w}: features are "
                            "at a very different pixel scale from its training (--grid N resamples in-plane)")
        if overrides.get("gamma") is not None and s.dc != "prox" and not (fits and s.dc == "cg"):
            ctx.record.warn(f"--gamma is ignored: it weights the proximal data consistency (MRI), and {name} here "
                            f"runs {s.dc}")
        if world_size > 1 and name == "d3ip-mbir":
            ctx.record.warn(f"d3ip-mbir under torchrun: TV along z couples slices within each of the {world_size} "
                            "shards, not across their boundaries")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    def progress(info: dict) -> None:
        if ctx.progress is not None:
            ctx.progress(info["step"], info["steps"], info)

    lockstep = world_size > 1 and name in ("dds", "d3ip", "d3ip-mbir")
    has_state = False
    if ctx.checkpoint_dir and ctx.resume:
        has_state = _has_state(ctx.checkpoint_dir, rank)
        if not dist.all_reduce_int(int(has_state), "max"):
            from d3ip_cli.core.errors import InputDataError

            raise InputDataError(f"--resume: no checkpoint in {ctx.checkpoint_dir} to continue from")
    elif ctx.checkpoint_dir and _has_state(ctx.checkpoint_dir, rank) and ctx.record is not None and rank == 0:
        ctx.record.warn(f"--checkpoint-dir {ctx.checkpoint_dir} holds an earlier run's sampler state: this run starts "
                        "afresh and replaces it (--resume continues it)")
    key_settings = {k: v for k, v in s.to_dict().items() if k != "chunk"}  # the chunk follows free memory
    gen = torch.Generator(device=dev)
    gen.manual_seed(int(ctx.seed))
    ck = None
    if ctx.checkpoint_dir:
        identity = run_identity(y, name, key_settings, {
            "seed": ctx.seed, "samples": n_samples, "prior": meta.get("sha256"), "world": world_size,
            "operator": repr(op), "device": dev.type,  # a CPU generator state cannot seed a CUDA one
            "adapter": _file_sha256(ctx.params.get("adapter"))})
        if lockstep:  # all ranks resume, or none (a kill can land before a rank's first save)
            has_state = bool(dist.all_reduce_int(int(has_state), "min"))
        ck = Checkpointer(f"{ctx.checkpoint_dir}/{CHECKPOINT_FOLDER}", identity,
                          every=int(ctx.params.get("checkpoint_every", 5)), rank=rank, resume=has_state)
        ck.install_signal_handlers()
    try:
        last = reconstruct(name, model, op, y, x_init, s, generator=gen, progress=progress, adapter=adapter,
                           checkpointer=ck, noise=level, chains=n_samples)
    finally:
        if ck is not None:
            ck.restore_signal_handlers()
    dump = os.environ.get("D3IP_DUMP_ADAPTER")
    if dump and last.adapter is not None:  # test hook: every rank writes its adapter
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in last.adapter.items()}, dump.format(rank=rank))
    if ctx.record is not None and rank == 0:
        ctx.record["prior"] = meta.get("path")
        ctx.record["prior_sha256"] = meta.get("sha256")
        ctx.record["prior_info"] = {"steps": meta.get("steps"), "images_seen": meta.get("images_seen"),
                                    "resolution": meta.get("resolution"), "preset": meta.get("preset"),
                                    "images_seen_total": meta.get("images_seen_total", meta.get("images_seen"))}
        ctx.record["engine"] = {"preset": ctx.preset or "fast", "settings": s.to_dict(), "memory": mp.to_dict(), "stats": last.stats,
                                "samples": n_samples, "world_size": world_size,
                                "data_fit": _data_fit_record(s, fits, ctx.noise)}
        if dev.type == "cuda":
            ctx.record["peak_device_memory_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
        ctx.record["model_evaluations"] = last.stats.get("nfe_sample", 0) + last.stats.get("nfe_adapt", 0)
    if rank != 0:
        return x_init  # non-zero ranks do not write; the caller checks dist.world()
    if ctx.params.get("save_adapter") and last.adapter is not None:
        lora.save_adapter(ctx.params["save_adapter"], _adapter_carrier(model, s, last.adapter),
                          {"architecture": meta["architecture"], "prior_sha256": meta.get("sha256"), "method": name,
                           "task": ctx.task, "settings": s.to_dict()})
        if ctx.record is not None:
            ctx.record.add_output(ctx.params["save_adapter"], role="adapter")
    if last.std is not None:
        ctx.extras = getattr(ctx, "extras", {}) or {}
        ctx.extras["std"] = last.std
    return last.image


def _data_fit_record(s: DiffusionSettings, fits: bool, noise: dict | None) -> dict[str, Any]:
    """What the data consistency ran, for the run record: fitted to the noise (at most ``cg_max`` CG
    steps) or fixed steps; for ``admm-tv-z`` also its ADMM x CG steps (after the fit, or alone)."""
    admm = s.dc == "admm-tv-z"
    out = {"fit": "noise" if fits else "steps", "dc": s.dc, "noise": (noise or {}).get("model", "unknown"),
           "tau": s.tau if fits else None, "cg_steps": s.cg_max if fits else (None if admm else s.cg_iter)}
    if admm:
        out["admm_steps"] = [s.admm_iter, s.admm_cg_iter]
    return out


def _file_sha256(path: str | None) -> str | None:
    if not path:
        return None
    from d3ip_cli.core.record import sha256_path

    return sha256_path(path)


# the folder of --checkpoint-dir that holds a run's sampler states (all its samples are drawn together)
CHECKPOINT_FOLDER = "sample0"


def _has_state(directory: str, rank: int) -> bool:
    from pathlib import Path

    d = Path(directory) / CHECKPOINT_FOLDER
    return (d / f"state-rank{rank}.safetensors").exists() or (d / f"state-rank{rank}.prev.safetensors").exists()


def _adapter_carrier(model: torch.nn.Module, s: DiffusionSettings, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    net = copy.deepcopy(model).cpu()
    lora.inject_lora(net, s.lora_rank, train_bias=s.train_bias)
    lora.load_adapter_state(net, {k: v.cpu() for k, v in state.items()})
    return net


def _register() -> None:
    from d3ip_cli.engine.methods import ALL_TASKS, PLANNED_METHODS, register_method

    common = {k: None for k in SETTING_FIELDS}
    common.update({"adapter": None, "save_adapter": None, "checkpoint_every": 5})
    for name in DIFFUSION_METHODS:
        def fn(op, y, x_init, ctx, _name=name):
            return run_registered(_name, op, y, x_init, ctx)

        fn.__name__ = f"diffusion_{name.replace('-', '_')}"
        # a method refuses the options it never takes (check_params: exit 2 before any work)
        defaults = {k: v for k, v in common.items() if k not in METHOD_REFUSES.get(name, ())}
        register_method(name, fn, ALL_TASKS, needs_prior=True, description=PLANNED_METHODS.get(name, name),
                        defaults=defaults, replace=True)


_register()
