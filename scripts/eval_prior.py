#!/usr/bin/env python
"""Quality of a phantom prior file, tracked against images seen (issue 4's acceptance).

Three measurements of a prior ``.safetensors`` file (DESIGN §5):

1. **One-step denoising** on ``--n`` held-out phantoms (``phantoms.training_batch`` with the
   prior's own recipe, whole ``--size`` images, seed ``--seed`` — distinct from the training
   seed). For each ``t`` in ``--ts`` (default 200, 400, 600)::

       x0' = 2 x0 - 1,   x_t = sqrt(abar_t) x0' + sqrt(1 - abar_t) eps
       x̂0  = (x_t - sqrt(1 - abar_t) eps_hat(x_t, t)) / sqrt(abar_t)      (Tweedie / DDIM)

   mapped back to ``[0, 1]`` and clipped; PSNR with data range 1 against ``x0``, averaged
   over images.

2. **TV baseline** on the same noisy inputs: ``skimage.restoration.denoise_tv_chambolle``
   on ``y = (x_t / sqrt(abar_t) + 1) / 2`` (image units; noise std
   ``sigma_t = sqrt(1 - abar_t) / sqrt(abar_t) / 2``), output clipped to ``[0, 1]``. Its weight
   is tuned per ``t`` by a grid search (``sigma_t * 2**k``, k = -3 .. 7 in half steps) for
   the best mean PSNR on *other* phantoms (``--tune-n`` from seed ``--tune-seed``), then
   evaluated on the test phantoms. A tuned weight on the edge of the grid is flagged.

   At the noisiest steps (t = 999, 900, 800, which set a sample's layout) the prior's x̂0 is
   compared with a constant image at the phantoms' mean intensity, the estimate any working
   denoiser must beat there.

3. **Unconditional samples** (only with ``--samples-png``): DDIM, ``--sample-steps`` (50)
   steps, eta 0, x̂0 clipped to the data range at each step, ``--n-samples`` (16) images at
   ``--size``, as a PNG grid; beside it
   (``<name>_phantoms.png``) as many phantoms of the prior's recipe, for comparison.
   Three image statistics put numbers on the comparison (:func:`image_statistics`, samples
   against the test phantoms): mean intensity, background share (pixels within 0.02 of the
   image's median: the phantoms' flat surround) and mean gradient magnitude (edge density).

4. **Reconstruction of phantoms** (``--recon-slices N``, default 4; 0 skips it): a 3D
   ellipsoid phantom volume ``[N, size, size]`` (seed ``--seed`` + 4) from simulated
   sparse-view data (30 views, noiseless), reconstructed with ``dds`` (``--preset fast`` over
   the whole trajectory, ``t_start`` 1000 as before session 8; seed 0: the prior alone, no adaptation), ``cgls`` and ``tv`` with its weight tuned on a
   second phantom volume (seed ``--tune-seed`` + 4); PSNR over the volume. This is the
   in-distribution reconstruction the engine's claims are about, tracked as the prior trains.

Output: a plain-text table (or one JSON object with ``--json``); ``--csv PATH`` appends a
row (training steps, images_seen, training wall_time_s, PSNR prior/TV per t, tuned TV
weights, ...) creating the file with a header when missing; ``--plot PATH`` draws the
prior's PSNR against images seen from that CSV (one line per t; TV as dashed horizontals).

Usage::

    python scripts/eval_prior.py [PRIOR] [--n 64] [--size 128] [--seed 10000] [--threads 2]
        [--batch 16] [--csv quality.csv] [--plot quality.png] [--samples-png samples.png] [--json]

    # the training run writes its prior while training: evaluate a copy
    cp runs/prior_cpu/phantom_cpu.safetensors /tmp/p.safetensors
    python scripts/eval_prior.py /tmp/p.safetensors --csv runs/prior_cpu/quality.csv \\
        --plot runs/prior_cpu/quality.png --samples-png runs/prior_cpu/eval_samples.png

``PRIOR`` defaults to the bundled prior (``d3ip_cli.prior.checkpoint.bundled_prior_path()``).
Exit status: 0 on success, 2 for a missing/unreadable prior or bad arguments.
Everything is seeded: the same prior file and arguments give the same numbers.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from d3ip_cli.prior.pretrain import totals

DEFAULT_TS = (200, 400, 600)
HIGH_TS = (999, 900, 800)  # high-noise check: the prior's x̂0 against a constant image
# weight = sigma_t * 2**k, k in [-3, 7] by halves: measured optima on 128² phantoms are k ~ 0.5 / 3 / 5
# at t = 200 / 400 / 600 (PSNR is flat beyond).
TV_GRID_EXPONENTS = tuple(k / 2 for k in range(-6, 15))
CSV_BASE_FIELDS = ("timestamp", "prior", "sha256", "steps", "images_seen", "wall_time_s", "n", "size", "seed",
                   "tune_seed", "tune_n")


# --------------------------------------------------------------------------- data

def make_phantoms(n: int, size: int, seed: int, recipe: dict, chunk: int = 16) -> torch.Tensor:
    """``n`` phantoms ``[n, 1, size, size]`` in ``[0, 1]``: the prior's recipe, whole images (no crop).

    Generated in chunks of ``chunk`` from one generator (bounded memory; each chunk mixes
    2D ellipses and 3D-ellipsoid slices in the recipe's proportion).
    """
    g = torch.Generator().manual_seed(int(seed))
    recipe = dict(recipe, crop=None)
    from d3ip_cli.prior import phantoms

    parts = [phantoms.training_batch(min(chunk, n - i), size, generator=g, recipe=recipe) for i in range(0, n, chunk)]
    return torch.cat(parts, 0)


def diffuse_all(x0: torch.Tensor, ts: Sequence[int], abar: torch.Tensor, seed: int) -> dict[int, torch.Tensor]:
    """``{t: x_t}`` in model units with independent seeded noise per ``t``."""
    g = torch.Generator().manual_seed(int(seed))
    x0m = x0 * 2 - 1
    out = {}
    for t in ts:
        a = float(abar[t])
        eps = torch.randn(x0m.shape, generator=g)
        out[t] = (a**0.5 * x0m + (1 - a) ** 0.5 * eps).float()
    return out


def psnr(est: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per-image PSNR (data range 1) of ``est``, ``ref`` ``[N, H, W]``."""
    mse = ((est.astype(np.float64) - ref.astype(np.float64)) ** 2).reshape(len(ref), -1).mean(1)
    return 10 * np.log10(1.0 / np.maximum(mse, 1e-12))


# --------------------------------------------------------------------------- prior

@torch.no_grad()
def tweedie(model: torch.nn.Module, xt: torch.Tensor, t: int, abar: torch.Tensor, batch: int) -> torch.Tensor:
    """The prior's one-step estimate x̂0 in ``[0, 1]`` (clipped), ``[N, H, W]``."""
    a = float(abar[t])
    outs = []
    for i in range(0, xt.shape[0], batch):
        x = xt[i:i + batch]
        eps = model(x, torch.full((x.shape[0],), t, dtype=torch.long))
        outs.append((x - (1 - a) ** 0.5 * eps) / a**0.5)
    x0m = torch.cat(outs, 0)
    return ((x0m + 1) / 2).clamp(0, 1)[:, 0]


def ddim_samples(model: torch.nn.Module, n: int, size: int, steps: int, seed: int, batch: int) -> np.ndarray:
    """``n`` unconditional samples (:func:`~d3ip_cli.engine.samplers.prior_samples`) in ``[0, 1]``."""
    from d3ip_cli.engine.samplers import prior_samples

    g = torch.Generator().manual_seed(int(seed))
    return prior_samples(model, n, size, steps=steps, batch=batch, generator=g).numpy()


# --------------------------------------------------------------------------- TV baseline

def image_statistics(imgs: np.ndarray) -> dict[str, float]:
    """Mean intensity, background share and mean gradient magnitude of images ``[n, h, w]`` in ``[0, 1]``."""
    flat = imgs.reshape(len(imgs), -1)
    background = np.abs(flat - np.median(flat, axis=1, keepdims=True)) < 0.02
    grad = np.abs(np.diff(imgs, axis=1)).mean() + np.abs(np.diff(imgs, axis=2)).mean()
    return {"mean": float(imgs.mean()), "background": float(background.mean()), "gradient": float(grad)}


def tv_observation(xt: torch.Tensor, t: int, abar: torch.Tensor) -> tuple[np.ndarray, float]:
    """``y = (x_t / sqrt(abar) + 1) / 2`` ``[N, H, W]`` and its noise std in image units."""
    a = float(abar[t])
    y = ((xt[:, 0].double() / a**0.5 + 1) / 2).numpy()
    return y, (1 - a) ** 0.5 / a**0.5 / 2


def tv_denoise(y: np.ndarray, weight: float) -> np.ndarray:
    from skimage.restoration import denoise_tv_chambolle

    return np.stack([np.clip(denoise_tv_chambolle(img, weight=weight), 0, 1) for img in y])


def tune_tv(y: np.ndarray, ref: np.ndarray, sigma: float) -> dict[str, Any]:
    """Grid search of the TV weight (``sigma * 2**k``) for the best mean PSNR on (y, ref)."""
    scores = []
    for k in TV_GRID_EXPONENTS:
        w = sigma * 2.0**k
        scores.append((float(psnr(tv_denoise(y, w), ref).mean()), w, k))
    best = max(scores)
    return {"weight": best[1], "tune_psnr": best[0],
            "on_grid_edge": best[2] in (TV_GRID_EXPONENTS[0], TV_GRID_EXPONENTS[-1])}


# --------------------------------------------------------------------------- reconstruction

RECON_TV_GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3)


def reconstruct_phantoms(prior: str | os.PathLike, *, n_slices: int, size: int, seed: int, tune_seed: int,
                         views: int = 30, preset: str = "fast", log=None) -> dict[str, Any]:
    """PSNR of ``dds`` (this prior), ``cgls`` and tuned ``tv`` on a sparse-view phantom volume."""
    from d3ip_cli.bench.metrics import volume_metrics
    from d3ip_cli.core.config import ReconConfig
    from d3ip_cli.core.device import make_generator
    from d3ip_cli.core.types import Volume
    from d3ip_cli.engine import recon as engine
    from d3ip_cli.prior.phantoms import ellipsoid_volume

    log = log or (lambda msg: None)
    dev = torch.device("cpu")

    def run(x: np.ndarray, method: str, weight: float | None = None) -> float:
        vol = Volume(data=x, affine=np.eye(4), meta={"modality": "OT", "units": "a.u."})
        # the dds probe samples the whole trajectory (t_start 1000), as every quality.csv row before
        # session 8 did: the fast preset's low start would make rows of one curve incomparable
        cfg = ReconConfig(task="sparse-view", views=views, method=method, prior=str(prior), preset=preset, seed=0,
                          weight=weight, t_start=1000 if method == "dds" else None)
        problem = engine.problem_from_volume(vol, cfg, device=dev)
        xr, _ = engine.run_method(problem, cfg, device=dev)
        return float(volume_metrics(engine.to_volume(xr, problem, method).data, problem.reference)["psnr"])

    x = ellipsoid_volume(n_slices, size, generator=make_generator(seed)).numpy()
    x_tune = ellipsoid_volume(2, size, generator=make_generator(tune_seed)).numpy()
    t0 = time.perf_counter()
    tv_weight = max(RECON_TV_GRID, key=lambda w: run(x_tune, "tv", w))
    out = {"slices": n_slices, "views": views, "preset": preset, "tv_weight": tv_weight,
           "psnr_tv": run(x, "tv", tv_weight), "psnr_cgls": run(x, "cgls")}
    t1 = time.perf_counter()
    out["psnr_dds"] = run(x, "dds")
    out["dds_s"] = round(time.perf_counter() - t1, 2)
    out["total_s"] = round(time.perf_counter() - t0, 2)
    log(f"phantom reconstruction ({n_slices} slices, sparse-view {views}): dds {out['psnr_dds']:.2f} dB, "
        f"tv {out['psnr_tv']:.2f} dB (weight {tv_weight:g}), cgls {out['psnr_cgls']:.2f} dB")
    return out


# --------------------------------------------------------------------------- evaluation

def evaluate(prior: str | os.PathLike, *, n: int = 64, size: int = 128, seed: int = 10_000,
             tune_seed: int = 20_000, tune_n: int = 20, ts: Sequence[int] = DEFAULT_TS, batch: int = 16,
             samples_png: str | os.PathLike | None = None, n_samples: int = 16, sample_steps: int = 50,
             recon_slices: int = 4, log=None) -> dict[str, Any]:
    """All measurements of one prior file -> a JSON-able dict (see the module docstring)."""
    from d3ip_cli.prior import checkpoint as ckpt
    from d3ip_cli.prior import schedule

    log = log or (lambda msg: None)
    t_start = time.perf_counter()
    model, meta = ckpt.load_prior(prior)
    f = model.config.downsampling_factor
    if size % f:
        raise ValueError(f"--size {size} is not divisible by the network's downsampling factor {f}")
    recipe = dict((meta.get("data") or {}).get("recipe") or {})
    train_seed = (meta.get("data") or {}).get("seed")
    if train_seed is not None and int(train_seed) in (seed, tune_seed):
        log(f"warning: evaluation seed equals the prior's training seed {train_seed}")
    abar = schedule.alphas_cumprod()
    ts = [int(t) for t in ts]
    for t in ts:
        if not 0 <= t < len(abar):
            raise ValueError(f"t={t} outside [0, {len(abar) - 1}]")

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    x_test = make_phantoms(n, size, seed, recipe)
    x_tune = make_phantoms(tune_n, size, tune_seed, recipe)
    xt_test = diffuse_all(x_test, ts, abar, seed + 1)
    xt_tune = diffuse_all(x_tune, ts, abar, tune_seed + 1)
    ref_test, ref_tune = x_test[:, 0].numpy(), x_tune[:, 0].numpy()
    timings["phantoms_s"] = time.perf_counter() - t0

    per_t: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    for t in ts:
        est = tweedie(model, xt_test[t], t, abar, batch).numpy()
        per_t[str(t)] = {"abar": float(abar[t]), "psnr_prior": float(psnr(est, ref_test).mean())}
        log(f"t={t}: prior {per_t[str(t)]['psnr_prior']:.2f} dB")
    # the noisiest steps, which set a sample's layout: the best estimate there is close to the
    # phantoms' mean, so a prior that does worse than a constant image has not learnt them
    high_noise: dict[str, dict[str, float]] = {}
    xt_high = diffuse_all(x_test, HIGH_TS, abar, seed + 5)
    const = np.full_like(ref_test, float(ref_tune.mean()))
    for t in HIGH_TS:
        est = tweedie(model, xt_high[t], t, abar, batch).numpy()
        high_noise[str(t)] = {"psnr_prior": float(psnr(est, ref_test).mean()),
                              "psnr_constant": float(psnr(const, ref_test).mean())}
    timings["prior_denoise_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    for t in ts:
        y_tune, sigma = tv_observation(xt_tune[t], t, abar)
        tuned = tune_tv(y_tune, ref_tune, sigma)
        y_test, _ = tv_observation(xt_test[t], t, abar)
        tv_psnr = float(psnr(tv_denoise(y_test, tuned["weight"]), ref_test).mean())
        row = per_t[str(t)]
        row.update(sigma_image=sigma, psnr_tv=tv_psnr, tv_weight=tuned["weight"],
                   tv_weight_on_grid_edge=tuned["on_grid_edge"], prior_wins=row["psnr_prior"] > tv_psnr,
                   margin_db=row["psnr_prior"] - tv_psnr)
        log(f"t={t}: TV {tv_psnr:.2f} dB (weight {tuned['weight']:.4g})")
    timings["tv_s"] = time.perf_counter() - t0

    samples = None
    if samples_png is not None:
        from d3ip_cli.io.figures import save_image_grid

        t0 = time.perf_counter()
        imgs = ddim_samples(model, n_samples, size, sample_steps, seed + 2, batch)
        save_image_grid(imgs, samples_png, title=f"unconditional DDIM ({sample_steps} steps, eta 0), "
                        "{steps} steps / {images_seen} images seen".format(**totals(meta)))
        timings["samples_s"] = time.perf_counter() - t0
        samples = {"path": str(samples_png), "n": n_samples, "steps": sample_steps,
                   "mean": float(imgs.mean()), "std": float(imgs.std()),
                   "stats": image_statistics(imgs), "phantom_stats": image_statistics(ref_test)}
        log(f"samples: {samples_png} ({timings['samples_s']:.0f} s)")
        # the training distribution beside them, to judge "looks like ellipse phantoms"
        real = make_phantoms(n_samples, size, seed + 3, recipe)[:, 0].numpy()
        phantoms_png = Path(samples_png).with_name(Path(samples_png).stem + "_phantoms.png")
        save_image_grid(real, phantoms_png, title="training phantoms (the prior's recipe, unseen seed) for comparison")
        samples["phantoms_path"] = str(phantoms_png)
    recon = None
    if recon_slices > 0:
        t0 = time.perf_counter()
        recon = reconstruct_phantoms(prior, n_slices=recon_slices, size=size, seed=seed + 4, tune_seed=tune_seed + 4,
                                     log=log)
        timings["recon_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start

    tot = totals(meta)
    return {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "prior": str(Path(prior)), "sha256": meta.get("sha256"), "preset": meta.get("preset"),
        # over all training stages (a prior fine-tuned with --init counts its parent's images too)
        "steps": tot["steps"], "images_seen": tot["images_seen"], "wall_time_s": tot["wall_time_s"],
        "stages": tot["stages"],
        "train_seed": train_seed, "n": n, "size": size, "seed": seed, "tune_seed": tune_seed, "tune_n": tune_n,
        "ts": ts, "per_t": per_t, "high_noise": high_noise, "prior_wins_all": all(v["prior_wins"] for v in per_t.values()),
        "samples": samples, "recon": recon, "timings": {k: round(v, 2) for k, v in timings.items()},
        "threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------- output

def format_table(res: dict[str, Any]) -> str:
    lines = [f"prior {res['prior']}  ({res.get('preset')}, {res['steps']} steps, {res['images_seen']} images seen, "
             f"trained {res['wall_time_s']} s)",
             f"one-step denoising, {res['n']} phantoms {res['size']}x{res['size']} (seed {res['seed']}); "
             f"TV weight tuned on {res['tune_n']} phantoms (seed {res['tune_seed']})",
             f"{'t':>5} {'abar':>7} {'sigma':>7} {'prior dB':>9} {'TV dB':>8} {'margin':>7} {'TV weight':>10}  winner"]
    for t, r in res["per_t"].items():
        edge = " (grid edge)" if r["tv_weight_on_grid_edge"] else ""
        lines.append(f"{t:>5} {r['abar']:7.4f} {r['sigma_image']:7.3f} {r['psnr_prior']:9.2f} {r['psnr_tv']:8.2f} "
                     f"{r['margin_db']:+7.2f} {r['tv_weight']:10.4g}  {'prior' if r['prior_wins'] else 'TV'}{edge}")
    if res.get("high_noise"):
        lines.append("high noise, prior x̂0 against a constant image at the phantoms' mean: " + ", ".join(
            f"t={t} {r['psnr_prior']:.2f} / {r['psnr_constant']:.2f} dB" for t, r in res["high_noise"].items()))
    if res.get("recon"):
        r = res["recon"]
        lines.append(f"phantom volume, {r['slices']} slices, sparse-view {r['views']} views: dds {r['psnr_dds']:.2f} dB, "
                     f"tv {r['psnr_tv']:.2f} dB (weight {r['tv_weight']:g}), cgls {r['psnr_cgls']:.2f} dB")
    if res.get("samples"):
        sm = res["samples"]
        lines.append(f"samples: {sm['path']}")
        if "stats" in sm:
            lines.append("sample statistics (samples / phantoms): " + ", ".join(
                f"{k} {sm['stats'][k]:.3f} / {sm['phantom_stats'][k]:.3f}" for k in sm["stats"]))
    lines.append("timings: " + ", ".join(f"{k} {v}" for k, v in res["timings"].items()))
    return "\n".join(lines)


def csv_row(res: dict[str, Any]) -> dict[str, Any]:
    row = {k: res.get(k) for k in CSV_BASE_FIELDS}
    for t, r in res["per_t"].items():
        row[f"psnr_prior_t{t}"] = round(r["psnr_prior"], 4)
        row[f"psnr_tv_t{t}"] = round(r["psnr_tv"], 4)
        row[f"tv_weight_t{t}"] = round(r["tv_weight"], 6)
    row["stages"] = res.get("stages", 1)
    for t, r in (res.get("high_noise") or {}).items():
        row[f"high_prior_t{t}"] = round(r["psnr_prior"], 4)
        row[f"high_constant_t{t}"] = round(r["psnr_constant"], 4)
    if res.get("recon"):
        for k in ("psnr_dds", "psnr_tv", "psnr_cgls"):
            row[f"recon_{k}"] = round(res["recon"][k], 4)
        row["recon_slices"] = res["recon"]["slices"]
    if res.get("samples") and "stats" in res["samples"]:
        for k, v in res["samples"]["stats"].items():
            row[f"sample_{k}"] = round(v, 4)
            row[f"phantom_{k}"] = round(res["samples"]["phantom_stats"][k], 4)
    row["eval_s"] = res["timings"]["total_s"]
    return row


def append_csv(path: str | os.PathLike, row: dict[str, Any]) -> None:
    """Append ``row``; write the header for a new file. A row with other noise levels (``--ts``)
    is refused; one with other new columns rewrites the file with the union of the columns
    (earlier rows leave them empty)."""
    from d3ip_cli.io.atomic import atomic_output

    p = Path(path)
    rows: list[dict[str, Any]] = []
    header: list[str] = []
    if p.exists() and p.stat().st_size > 0:
        with open(p, newline="") as fh:
            reader = csv.DictReader(fh)
            header = list(reader.fieldnames or [])
            rows = list(reader)
    per_t = lambda cols: {c for c in cols if c.startswith(("psnr_prior_t", "psnr_tv_t", "tv_weight_t"))}  # noqa: E731
    if header and per_t(header) != per_t(row):
        raise ValueError(f"{p} has the noise levels {sorted(per_t(header))}, this evaluation writes "
                         f"{sorted(per_t(row))} (other --ts?); use another --csv file")
    if header and set(row) <= set(header):
        with open(p, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=header, restval="").writerow(row)
        return
    header = header + [k for k in row if k not in header]
    p.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(p, overwrite=True) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=header, restval="")
            w.writeheader()
            w.writerows(rows + [row])


def _stage_starts(rows: list[dict[str, Any]]) -> list[float]:
    """Images seen at the first evaluation of each later training stage (``stages`` column)."""
    out, last = [], None
    for r in rows:
        stage = r.get("stages") or "1"
        if last is not None and stage != last:
            out.append(float(r["images_seen"]))
        last = stage
    return out


def plot_csv(csv_path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """PSNR vs images seen from the CSV: prior per t as lines, TV (latest row) as dashed horizontals.

    Only rows with the latest row's evaluation settings (n, size, seed) are drawn.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from d3ip_cli.io.atomic import atomic_output

    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"{csv_path} has no rows to plot")
    key = lambda r: (r["n"], r["size"], r["seed"])  # noqa: E731
    rows = sorted((r for r in rows if key(r) == key(rows[-1])), key=lambda r: float(r["images_seen"]))
    ts = [c[len("psnr_prior_t"):] for c in rows[0] if c.startswith("psnr_prior_t")]
    xs = [float(r["images_seen"]) for r in rows]
    recon = [r for r in rows if r.get("recon_psnr_dds")]
    fig, axes = plt.subplots(1, 2 if recon else 1, figsize=(11.5 if recon else 6.4, 4), squeeze=False, sharex=True)
    ax = axes[0, 0]
    for i, t in enumerate(ts):
        color = f"C{i}"
        ax.plot(xs, [float(r[f"psnr_prior_t{t}"]) for r in rows], "-o", ms=3, color=color, label=f"prior, t={t}")
        ax.axhline(float(rows[-1][f"psnr_tv_t{t}"]), ls="--", lw=1, color=color, label=f"tuned TV, t={t}")
    ax.set_ylabel("one-step denoising PSNR (dB)")
    ax.set_title(f"denoising ({rows[-1]['n']} phantoms {rows[-1]['size']}², seed {rows[-1]['seed']})", fontsize=9)
    if recon:
        bx = axes[0, 1]
        rx = [float(r["images_seen"]) for r in recon]
        bx.plot(rx, [float(r["recon_psnr_dds"]) for r in recon], "-o", ms=3, color="C3", label="dds (this prior)")
        bx.axhline(float(recon[-1]["recon_psnr_tv"]), ls="--", lw=1, color="C0", label="tuned TV")
        bx.axhline(float(recon[-1]["recon_psnr_cgls"]), ls=":", lw=1, color="C7", label="CGLS")
        bx.set_ylabel("reconstruction PSNR (dB)")
        bx.set_title(f"sparse-view 30 views, {recon[-1].get('recon_slices')}-slice phantom volume, fast preset",
                     fontsize=9)
    if len(xs) > 1 and min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")  # shared by both panels
    for a in axes[0]:
        a.set_xlabel("images seen in training (all stages)")
        for x_stage in _stage_starts(rows):
            a.axvline(x_stage, color="k", lw=0.8, ls="-.", alpha=0.5)
        a.grid(alpha=0.3)
        a.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_output(out, overwrite=True) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(out)


# --------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval_prior.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prior", nargs="?", default=None, help="prior .safetensors file (default: the bundled prior)")
    p.add_argument("--n", type=int, default=64, help="test phantoms (default 64)")
    p.add_argument("--size", type=int, default=128, help="phantom size in pixels (default 128)")
    p.add_argument("--seed", type=int, default=10_000, help="test phantom seed (default 10000; training uses 0)")
    p.add_argument("--tune-n", type=int, default=20, help="phantoms for tuning the TV weight (default 20)")
    p.add_argument("--tune-seed", type=int, default=20_000, help="seed of the TV tuning phantoms (default 20000)")
    p.add_argument("--ts", type=int, nargs="+", default=list(DEFAULT_TS), help="diffusion steps (default 200 400 600)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--batch", type=int, default=16, help="images per network evaluation (default 16)")
    p.add_argument("--samples-png", default=None, help="write unconditional DDIM samples as a PNG grid here")
    p.add_argument("--n-samples", type=int, default=16, help="number of samples (default 16)")
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps for the samples (default 50)")
    p.add_argument("--recon-slices", type=int, default=4,
                   help="slices of the phantom volume reconstructed with dds/cgls/tv (default 4; 0: skip)")
    p.add_argument("--csv", default=None, help="append a row to this CSV (created with a header if missing)")
    p.add_argument("--plot", default=None, help="draw PSNR vs images seen from --csv into this PNG")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(None if argv is None else [str(a) for a in argv])
    from d3ip_cli.core.errors import InputDataError
    from d3ip_cli.prior import checkpoint as ckpt

    def log(msg: str) -> None:
        if not args.quiet:
            print(f"[eval_prior] {msg}", file=sys.stderr, flush=True)

    prior = Path(args.prior) if args.prior else ckpt.bundled_prior_path()
    if not prior.is_file():
        which = "" if args.prior else "the bundled prior "
        print(f"eval_prior: {which}{prior} does not exist; pass a prior file, e.g. "
              "runs/prior_cpu/phantom_cpu.safetensors (copy it first if a training run is writing it)", file=sys.stderr)
        return 2
    if args.plot and not args.csv:
        print("eval_prior: --plot draws from the --csv file; pass --csv too", file=sys.stderr)
        return 2
    if min(args.n, args.tune_n, args.batch, args.n_samples, args.sample_steps) < 1:
        print("eval_prior: --n, --tune-n, --batch, --n-samples and --sample-steps must be positive", file=sys.stderr)
        return 2
    if args.csv and Path(args.csv).is_file() and Path(args.csv).stat().st_size > 0:
        with open(args.csv, newline="") as fh:
            have = {c[len("psnr_prior_t"):] for c in next(csv.reader(fh), []) if c.startswith("psnr_prior_t")}
        if have and have != {str(t) for t in args.ts}:  # refuse before spending minutes on the evaluation
            print(f"eval_prior: {args.csv} holds the noise levels t = {', '.join(sorted(have, key=int))}; "
                  "evaluate the same --ts or use another --csv file", file=sys.stderr)
            return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        res = evaluate(prior, n=args.n, size=args.size, seed=args.seed, tune_seed=args.tune_seed, tune_n=args.tune_n,
                       ts=args.ts, batch=args.batch, samples_png=args.samples_png, n_samples=args.n_samples,
                       sample_steps=args.sample_steps, recon_slices=args.recon_slices, log=log)
    except (InputDataError, ValueError) as exc:
        print(f"eval_prior: {exc}", file=sys.stderr)
        return 2
    if args.csv:
        try:
            append_csv(args.csv, csv_row(res))
            res["csv"] = str(args.csv)
            if args.plot:
                res["plot"] = str(plot_csv(args.csv, args.plot))
        except ValueError as exc:
            print(f"eval_prior: {exc}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(res))
    else:
        print(format_table(res))
        for k in ("csv", "plot"):
            if k in res:
                print(f"{k}: {res[k]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
