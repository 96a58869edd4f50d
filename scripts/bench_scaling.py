#!/usr/bin/env python
"""Wall time and network evaluations of ``d3ip`` (one shared adapter) against ``ddip`` (one per slice) as slices grow.

For each slice count ``Z`` a random 3D ellipsoid phantom ``[Z, size, size]`` is reconstructed
from simulated data (default: sparse-view, 30 views) with each method through the same
wiring as ``d3ip reconstruct`` (fixed seed, ``--preset``). Reported per run: wall time,
network evaluations while sampling (``nfe_sample``) and adapting (``nfe_adapt``, each also
back-propagated), PSNR, wall time and CPU time of the process (``time.process_time``: with
``--threads 1`` it is the single thread's time, which other load on a shared machine
disturbs much less than the wall time).

The asymptotic cost ratio follows from the evaluation counts, which are linear in ``Z``:
per extra slice, d3ip adds only its sampling evaluations (its adaptation cost is a fixed
K x M slices per step), while ddip adds sampling *and* a full adaptation per slice. The
script fits ``nfe = a + b Z`` to each method and prints ``b_ddip / b_d3ip``, both in raw
evaluations and in forward-equivalents (an adaptation evaluation counted as
``1 + --backward-cost`` forwards; 2 by default).

Usage: python scripts/bench_scaling.py [--slices 8,16,32,64] [--size 64] [--methods d3ip,ddip]
                                       [--prior P] [--preset fast] [--task sparse-view] [--views 30]
                                       [--threads 1] [--json OUT.json] [--plot OUT.png]
                                       [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch


def run_one(method: str, n: int, args: argparse.Namespace) -> dict:
    from d3ip_cli.bench.metrics import volume_metrics
    from d3ip_cli.core.config import ReconConfig
    from d3ip_cli.core.device import make_generator
    from d3ip_cli.core.record import RunRecord
    from d3ip_cli.core.types import Volume
    from d3ip_cli.engine import recon as engine
    from d3ip_cli.prior.phantoms import ellipsoid_volume

    x = ellipsoid_volume(n, args.size, generator=make_generator(args.seed)).numpy()
    vol = Volume(data=x, affine=np.eye(4), meta={"modality": "OT", "units": "a.u."})
    opts = {"views": args.views} if args.task == "sparse-view" else (
        {"arc": args.arc} if args.task == "limited-angle" else {"acceleration": args.acceleration})
    from d3ip_cli.engine.diffusion import SETTING_FIELDS
    from d3ip_cli.engine.methods import get_method

    takes = get_method(method).defaults
    engine_opts = {}
    for item in args.set:  # KEY=VALUE engine settings, as in d3ip reconstruct --KEY VALUE
        k, _, v = item.partition("=")
        k = k.replace("-", "_")
        if k in takes or k not in SETTING_FIELDS:
            engine_opts[k] = v  # (a key of no method is left for ReconConfig to refuse)
        else:  # e.g. adapt_iters for dds, which does not adapt
            print(f"# --set {k}: not an option of {method}, left out for it", file=sys.stderr)
    cfg = ReconConfig(task=args.task, method=method, prior=args.prior, preset=args.preset, seed=args.seed, **opts,
                      **engine_opts)
    dev = torch.device(args.device)
    problem = engine.problem_from_volume(vol, cfg, device=dev)
    rec = RunRecord("bench_scaling")
    t, c = time.perf_counter(), time.process_time()
    xr, _ = engine.run_method(problem, cfg, device=dev, record=rec)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    out = engine.to_volume(xr, problem, method)
    stats = (rec["engine"] or {}).get("stats", {}) if "engine" in rec.doc else {}
    return {"method": method, "slices": n, "size": args.size, "wall_time_s": round(wall, 3), "cpu_time_s": round(cpu, 3),
            "nfe_sample": stats.get("nfe_sample"), "nfe_adapt": stats.get("nfe_adapt"),
            "model_evaluations": rec.doc.get("model_evaluations"),
            "psnr": volume_metrics(out.data, problem.reference)["psnr"]}


def slope(points: list[tuple[int, float]]) -> float | None:
    if len(points) < 2:
        return None
    z, v = np.array(points, dtype=float).T
    return float(np.polyfit(z, v, 1)[0])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", default="8,16,32,64", help="comma-separated slice counts (64 takes long on a CPU)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--methods", default="d3ip,ddip")
    ap.add_argument("--prior", default=None, help="prior file (default: the bundled prior)")
    ap.add_argument("--preset", default="fast", choices=["fast", "standard", "paper"])
    ap.add_argument("--task", default="sparse-view", choices=["sparse-view", "limited-angle", "cs-mri"])
    ap.add_argument("--views", type=int, default=30)
    ap.add_argument("--arc", type=float, default=90.0)
    ap.add_argument("--acceleration", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backward-cost", type=float, default=2.0, help="a backward pass in forward passes")
    ap.add_argument("--json", default=None, help="write the results here (JSON)")
    ap.add_argument("--plot", default=None, help="write a PNG of wall time against slices")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an engine setting for every run, e.g. adapt_iters=12 (repeatable)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    counts = [int(s) for s in args.slices.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]

    rows = []
    print(f"{args.task}, {args.size}x{args.size} slices, preset {args.preset}, {torch.get_num_threads()} torch "
          f"thread(s), {args.device}", flush=True)
    print(f"{'method':<10}{'slices':>7}{'wall s':>9}{'CPU s':>9}{'nfe_sample':>12}{'nfe_adapt':>11}{'PSNR':>8}",
          flush=True)
    for n in counts:
        for m in methods:
            r = run_one(m, n, args)
            rows.append(r)
            print(f"{m:<10}{n:>7}{r['wall_time_s']:>9.1f}{r['cpu_time_s']:>9.1f}{r['nfe_sample']:>12}"
                  f"{r['nfe_adapt']:>11}{r['psnr']:>8.2f}", flush=True)

    summary: dict = {"ratios": [], "asymptotic": {}}
    by = {(r["method"], r["slices"]): r for r in rows}
    if "d3ip" in methods and "ddip" in methods:
        for n in counts:
            a, b = by[("d3ip", n)], by[("ddip", n)]
            summary["ratios"].append({"slices": n, "time_ddip_over_d3ip": round(b["wall_time_s"] / a["wall_time_s"], 3),
                                      "cpu_ddip_over_d3ip": round(b["cpu_time_s"] / a["cpu_time_s"], 3),
                                      "nfe_ddip_over_d3ip": round(b["model_evaluations"] / a["model_evaluations"], 3)})
        k = 1.0 + args.backward_cost
        fe = {m: slope([(r["slices"], r["nfe_sample"] + k * r["nfe_adapt"]) for r in rows if r["method"] == m])
              for m in ("d3ip", "ddip")}
        raw = {m: slope([(r["slices"], r["model_evaluations"]) for r in rows if r["method"] == m]) for m in ("d3ip", "ddip")}
        tm = {m: slope([(r["slices"], r["wall_time_s"]) for r in rows if r["method"] == m]) for m in ("d3ip", "ddip")}
        ct = {m: slope([(r["slices"], r["cpu_time_s"]) for r in rows if r["method"] == m]) for m in ("d3ip", "ddip")}
        if raw["d3ip"]:
            summary["asymptotic"] = {
                "nfe_per_slice": raw, "forward_equivalents_per_slice": fe, "seconds_per_slice": tm,
                "nfe_ratio": round(raw["ddip"] / raw["d3ip"], 3),
                "forward_equivalent_ratio": round(fe["ddip"] / fe["d3ip"], 3),
                "time_ratio": round(tm["ddip"] / tm["d3ip"], 3) if tm["d3ip"] else None,
                "cpu_seconds_per_slice": ct, "cpu_time_ratio": round(ct["ddip"] / ct["d3ip"], 3) if ct["d3ip"] else None,
            }
        print("\nslices  wall ddip/d3ip  CPU ddip/d3ip  NFE ddip/d3ip")
        for r in summary["ratios"]:
            print(f"{r['slices']:>6}  {r['time_ddip_over_d3ip']:>14.2f}  {r['cpu_ddip_over_d3ip']:>13.2f}  "
                  f"{r['nfe_ddip_over_d3ip']:>13.2f}")
        if summary["asymptotic"]:
            s = summary["asymptotic"]
            print(f"asymptotic (slope of a linear fit in slices): NFE ratio {s['nfe_ratio']:.2f}, forward-equivalent "
                  f"ratio {s['forward_equivalent_ratio']:.2f} (backward = {args.backward_cost:g} forwards), "
                  f"wall-time ratio {s['time_ratio']}, CPU-time ratio {s['cpu_time_ratio']}")
    doc = {"settings": {k: v for k, v in vars(args).items()}, "threads": torch.get_num_threads(), "rows": rows,
           **summary}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=2)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        for m in methods:
            pts = [(r["slices"], r["wall_time_s"]) for r in rows if r["method"] == m]
            ax.plot(*zip(*pts), marker="o", label=m)
        ax.set_xlabel("slices")
        ax.set_ylabel("wall time (s)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
        ax.set_title(f"{args.task}, {args.size}^2, preset {args.preset}")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
