"""Ablation study of the diffusion engine's settings on one retrospective problem.

Why does a method win or lose? This script answers with measurements: it builds one
problem (a volume + task), then runs each *variant* (a method plus engine settings) and
prints PSNR / SSIM / through-slice error / wall time, with tuned ``tv`` and ``cgls`` as
references. Variants are ``NAME=method[:key=value,...]`` with the keys of
:class:`~d3ip_cli.engine.diffusion.DiffusionSettings`, plus ``samples=K`` (the mean of K
runs with seeds ``seed .. seed+K-1``: an estimate of the posterior mean).
``--trajectory`` also prints, for each ``dds`` variant, the PSNR of the Tweedie estimate
x̂0 and of its data-consistent x̃0 at every sampling step.

Example (the numbers on issue 5 and in the README come from commands like this)::

    OMP_NUM_THREADS=1 python scripts/study_engine.py --volume mni --task sparse-view --views 30 \\
        --slices 6:14 --grid 128 --preset fast \\
        --variant dds=dds --variant d3ip=d3ip --variant eta0=dds:eta=0 --csv study.csv

``--volume phantom`` uses a random 3D ellipsoid phantom (in distribution) of ``--n-slices``.
``--real-image`` (MRI) constrains every method to real images: the operator takes real input and
its adjoint keeps the real part, so the prior sees no imaginary image (a question asked of the
engine, not a product option: measured k-space has phase).
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from d3ip_cli.bench.metrics import volume_metrics
from d3ip_cli.baselines.tv import tv as tv_baseline
from d3ip_cli.bench.runner import _write_phantom, example_path
from d3ip_cli.core.config import ReconConfig
from d3ip_cli.engine import diffusion
from d3ip_cli.engine.recon import load_problem, run_method, to_volume
from d3ip_cli.physics.base import LinearOperator
from d3ip_cli.physics.registry import TASKS
from d3ip_cli.prior.checkpoint import bundled_prior_path, load_prior


class RealImage(LinearOperator):
    """``op`` on real images: ``A`` as is, adjoint ``Re(A^H y)`` (exact for the real inner product)."""

    def __init__(self, op: LinearOperator) -> None:
        super().__init__(op.in_shape, op.out_shape)
        self.op = op
        self.complex_output = op.complex_output

    def _A(self, x: torch.Tensor) -> torch.Tensor:
        return self.op.A(x)

    def _A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self.op.A_adjoint(y).real

    def select(self, index) -> "RealImage":
        return RealImage(self.op.select(index))


def parse_variant(text: str) -> tuple[str, str, dict]:
    name, _, spec = text.partition("=")
    method, _, opts = spec.partition(":")
    overrides: dict = {}
    fields = {f.name for f in diffusion.dataclasses.fields(diffusion.DiffusionSettings)}
    for item in filter(None, opts.split(",")):
        k, _, v = item.partition("=")
        if k not in fields and k != "samples":
            raise SystemExit(f"unknown setting {k!r} in variant {text!r}")
        if v in ("True", "False"):
            overrides[k] = v == "True"
        elif v == "None":
            overrides[k] = None
        else:
            try:
                overrides[k] = int(v)
            except ValueError:
                try:
                    overrides[k] = float(v)
                except ValueError:
                    overrides[k] = v
    return name, method or name, overrides


def trajectory(model: torch.nn.Module, problem, x_init: torch.Tensor, s, seed: int, level=None) -> None:
    """PSNR (normalised units) of x̂0 and x̃0 = dc(x̂0) at every step of one dds run (``level``: the
    data's noise level, which ``fit = noise`` reads, as in the run itself)."""
    from d3ip_cli.engine.samplers import ddim_sample, diffuse
    from d3ip_cli.prior import schedule

    ref = torch.as_tensor(problem.scale.normalise(problem.reference))
    rng = float(ref.max() - ref.min())
    smap = diffusion.StateMap(ref.shape[0], x_init.is_complex())

    def psnr(state: torch.Tensor) -> float:
        img = smap.to_image(state)
        img = img.abs() if img.is_complex() else img
        return 10 * float(np.log10(rng**2 / float(((img - ref) ** 2).mean())))

    abar = schedule.alphas_cumprod()
    ts = schedule.ddim_timesteps(s.steps, t_start=s.t_start)
    gen = torch.Generator().manual_seed(seed)
    x = diffuse(smap.to_state(x_init), ts[0], abar, gen)

    def show(info: dict) -> None:
        print(f"    t={info['t']:4d}  x0_hat {psnr(info['x0']):6.2f} dB  x0_dc {psnr(info['x0_dc']):6.2f} dB", flush=True)

    ddim_sample(diffusion.make_eps_model(model, s.chunk), x, ts, abar, eta=s.eta,
                dc=diffusion.make_dc(problem.op, problem.y, smap, s, level), generator=gen, callback=show)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volume", default="mni", help="mni (the bundled example), phantom, or a volume path")
    ap.add_argument("--task", default="sparse-view")
    ap.add_argument("--views", type=int, default=30)
    ap.add_argument("--arc", type=float, default=90.0)
    ap.add_argument("--acceleration", type=float, default=4.0)
    ap.add_argument("--mask", default="uniform1d", help="cs-mri: uniform1d, gaussian1d or poisson2d")
    ap.add_argument("--coils", type=int, default=1, help="cs-mri: simulated receive coils (birdcage maps, SENSE)")
    ap.add_argument("--slices", default=None)
    ap.add_argument("--n-slices", type=int, default=8, help="phantom slices")
    ap.add_argument("--grid", type=int, default=128)
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--prior", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sampler-seed", type=int, default=None,
                    help="seed of the diffusion runs (default --seed; --seed also picks the phantom)")
    ap.add_argument("--tv-weights", default="1e-5,3e-5,1e-4,3e-4,1e-3", help="tv weights tried (best reported)")
    ap.add_argument("--variant", action="append", default=[], help="NAME=method[:key=value,...]")
    ap.add_argument("--csv", default=None, help="append rows to this CSV")
    ap.add_argument("--trajectory", action="store_true", help="per-step PSNR of x̂0 and x̃0 for dds variants")
    ap.add_argument("--real-image", action="store_true", help="MRI: constrain every method to real images")
    ap.add_argument("--noise", default="none", help="none, poisson (CT photon counts, --i0) or gaussian (--sigma)")
    ap.add_argument("--i0", type=float, default=1e5, help="incident photons per ray for --noise poisson")
    ap.add_argument("--sigma", type=float, default=0.01, help="--noise gaussian: std relative to the data's RMS")
    ap.add_argument("--tv2d", action="store_true",
                    help="also report tv with the through-slice weight 0 (each slice alone; tuned like tv)")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="d3ip-study-"))
    if args.volume == "mni":
        path = example_path()
        if path is None:
            raise SystemExit("the bundled example is not in this checkout")
    elif args.volume == "phantom":
        path = _write_phantom(tmp, args.n_slices, args.grid, args.seed + 100)
    else:
        path = Path(args.volume)
    opts = {"views": args.views, "arc": args.arc, "acceleration": args.acceleration, "mask": args.mask,
            "coils": args.coils}
    cfg = ReconConfig(task=args.task, method="cgls", slices=args.slices, grid=args.grid,
                      seed=args.seed, noise=args.noise, i0=args.i0, sigma=args.sigma, **opts)
    problem = load_problem(path, cfg)
    if args.real_image:
        problem.op = RealImage(problem.op)
    ref = problem.reference
    modality = TASKS[args.task].modality
    noise_label = {"poisson": f"poisson i0={args.i0:g}", "gaussian": f"gaussian sigma={args.sigma:g}"}.get(args.noise, "")
    prior = args.prior or str(bundled_prior_path())
    model, meta = load_prior(prior)
    model.eval()
    print(f"# {path.name} {args.task} {opts} slices={args.slices} grid={args.grid} z={ref.shape[0]} "
          f"prior={Path(prior).name} steps={meta.get('steps')} preset={args.preset}"
          + (" real-image" if args.real_image else "") + (f" mask={args.mask} coils={args.coils}" if args.task == "cs-mri" else "")
          + (f" noise={noise_label}" if args.noise != "none" else ""),
          flush=True)

    rows = []

    def report(name: str, x: torch.Tensor, seconds: float, extra: str = "") -> None:
        vol = to_volume(x, problem, name)
        m = volume_metrics(vol.data, ref)
        row = {"volume": args.volume, "task": args.task, "views": args.views, "grid": args.grid,
               "slices": ref.shape[0], "variant": name, "psnr": m["psnr"], "ssim": m["ssim"],
               "z_rel_l2": m["z_rel_l2"], "seconds": round(seconds, 1),
               "settings": " ".join(filter(None, [extra, "real-image" if args.real_image else "",
                                                  f"mask={args.mask}" if args.task == "cs-mri" else "",
                                                  f"coils={args.coils}" if args.coils != 1 else "",
                                                  f"noise={noise_label}" if args.noise != "none" else ""])),
               "prior_steps": meta.get("steps")}
        rows.append(row)
        print(f"{name:24s} psnr {m['psnr']:7.3f}  ssim {m['ssim']:.4f}  z-err {m['z_rel_l2']:.4f}  "
              f"{seconds:6.1f} s  {extra}", flush=True)

    tv_weights = [float(w) for w in args.tv_weights.split(",")]
    for method in ("cgls", "tv") + (("tv2d",) if args.tv2d else ()):
        weights = [None] if method == "cgls" else tv_weights
        best = None
        for w in weights:
            t0 = time.perf_counter()
            if method == "tv2d":  # the tv baseline's own defaults, slices decoupled
                x = tv_baseline(problem.op, problem.y, weight=w, weight_z=0.0)
            else:
                x, _ = run_method(problem, cfg.model_copy(update={"method": method, "weight": w}))
            dt = time.perf_counter() - t0
            p = volume_metrics(to_volume(x, problem, method).data, ref)["psnr"]
            if best is None or p > best[0]:
                best = (p, x, dt, w)
        report(method, best[1], best[2], "" if best[3] is None else f"weight={best[3]:g}")

    with torch.no_grad():
        x_init = problem.op.pinv(problem.y)
    from d3ip_cli.physics.noise import noise_level

    level = noise_level(problem.y, problem.noise, getattr(problem.op, "mask", None) if modality == "MR" else None)
    for text in args.variant:
        name, method, overrides = parse_variant(text)
        n_samples = int(overrides.pop("samples", 1))
        s = diffusion.settings_for(method, args.preset, modality, args.task, **overrides)
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(args.seed if args.sampler_seed is None else args.sampler_seed)
        image = diffusion.reconstruct(method, model, problem.op, problem.y, x_init, s, generator=gen,
                                      noise=level, chains=n_samples).image  # samples drawn together
        desc = f"{method} " + ",".join(f"{k}={v}" for k, v in overrides.items())
        if args.sampler_seed is not None:
            desc += f" sampler_seed={args.sampler_seed}"
        report(name, image, time.perf_counter() - t0,
               desc + (f" mean of {n_samples} samples" if n_samples > 1 else ""))
        if args.trajectory and method == "dds":
            trajectory(model, problem, x_init, s, args.seed, level)

    if args.csv:
        append_csv(args.csv, rows)
    return 0


def append_csv(path: str | Path, rows: list[dict]) -> None:
    """Append ``rows`` to the CSV at ``path``, writing the header when the file is new."""
    new = not Path(path).exists()
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    sys.exit(main())
