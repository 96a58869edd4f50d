#!/usr/bin/env python
"""Measure how the peak memory of ``d3ip reconstruct`` grows with the number of slices.

Runs the real CLI once per slice count, each in a fresh process (peak resident memory
is per process), on slabs of one ellipsoid phantom (128x128 slices by default), reads
``peak_memory_mb`` (and, on CUDA, ``peak_device_memory_mb``) from each run record, and
fits a line: slope in MB per slice, intercept (the fixed cost: interpreter, torch, the
prior, network activations of an adaptation step) and R². The engine's memory plan
(network chunk, estimated MB per slice) is printed beside the measurement.

Memory does not depend on the prior's weights, only on its architecture: without
``--prior`` the bundled prior is used, or when absent a throwaway prior with the bundled
(``cpu`` preset) architecture is trained for one step. The run count is short
(``--steps 2 --adapt-iters 1``) since time does not change the peak.
Not a timed test: run it by hand.

Usage: python scripts/bench_memory.py [--slices 16 32 64] [--size 128] [--method d3ip] [--device cpu] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _prior(path: str | None, workdir: Path) -> str:
    from d3ip_cli.prior.checkpoint import bundled_prior_path

    if path:
        return path
    if bundled_prior_path().exists():
        return str(bundled_prior_path())
    from d3ip_cli.prior import pretrain as pt

    out = workdir / "throwaway_cpu_arch.safetensors"
    print("no bundled prior: training a throwaway one (cpu architecture, 1 step)", file=sys.stderr)
    pt.train(pt.PretrainConfig.from_preset("cpu", steps=1, batch_size=2), out)
    return str(out)


def _volume(n: int, size: int, workdir: Path) -> Path:
    import torch

    from d3ip_cli.core.types import Volume
    from d3ip_cli.io.volumes import write_volume
    from d3ip_cli.prior.phantoms import ellipsoid_volume

    x = ellipsoid_volume(n, size, generator=torch.Generator().manual_seed(0))
    return write_volume(Volume(x.numpy()), workdir / f"phantom_{n}x{size}.npy")


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    ss_res = sum((y - (intercept + slope * x)) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return slope, intercept, (1 - ss_res / ss_tot) if ss_tot > 0 else 1.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--task", default="sparse-view")
    ap.add_argument("--method", default="d3ip")
    ap.add_argument("--prior", default=None)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--adapt-iters", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the runs")
    ap.add_argument("--workdir", default=None, help="keep inputs/outputs here (default: a temporary directory)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    if len(args.slices) < 2:
        ap.error("give at least two slice counts to fit a line")

    with tempfile.TemporaryDirectory(prefix="d3ip-bench-memory-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        prior = _prior(args.prior, work)
        vol = _volume(max(args.slices), args.size, work)
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        rows = []
        for n in args.slices:
            out = work / f"recon_{n}.npy"
            cmd = [sys.executable, "-m", "d3ip_cli", "reconstruct", str(vol), "--task", args.task,
                   "--slices", f"0:{n}", "--method", args.method, "--prior", prior, "--steps", str(args.steps),
                   "--device", args.device, "-o", str(out), "--overwrite", "--json"]
            if args.method != "dds":  # dds does not adapt (and refuses the option)
                cmd += ["--adapt-iters", str(args.adapt_iters)]
            t = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                print(f"run with {n} slices failed (exit {proc.returncode})", file=sys.stderr)
                return 1
            doc = json.loads(proc.stdout)
            mem = doc["engine"]["memory"]
            rows.append({"slices": n, "peak_memory_mb": doc["peak_memory_mb"],
                         "peak_device_memory_mb": doc.get("peak_device_memory_mb"), "chunk": mem["chunk"],
                         "planned_mb_per_slice": mem["per_slice_mb"], "wall_s": round(time.perf_counter() - t, 1),
                         "reconstruct_s": doc["timings_s"].get("reconstruct")})
            print(f"{n:4d} slices: peak RSS {doc['peak_memory_mb']:8.1f} MB"
                  + (f", device {rows[-1]['peak_device_memory_mb']:.1f} MB" if rows[-1]["peak_device_memory_mb"] else "")
                  + f"  (chunk {mem['chunk']}, {rows[-1]['wall_s']} s)", file=sys.stderr)
        xs = [float(r["slices"]) for r in rows]
        result = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "size": args.size,
                  "task": args.task, "method": args.method, "steps": args.steps, "adapt_iters": args.adapt_iters,
                  "device": args.device, "threads": args.threads, "prior": prior, "runs": rows}
        for key in ("peak_memory_mb", "peak_device_memory_mb"):
            ys = [r[key] for r in rows]
            if all(y is not None for y in ys):
                slope, intercept, r2 = _fit(xs, [float(y) for y in ys])
                result[key.replace("peak_", "fit_")] = {"slope_mb_per_slice": round(slope, 2),
                                                        "intercept_mb": round(intercept, 1), "r2": round(r2, 5)}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"\n{args.method} {args.task}, {args.size}x{args.size} slices, --steps {args.steps} "
          f"--adapt-iters {args.adapt_iters}, device {args.device}")
    print(f"{'slices':>6} {'peak RSS MB':>12} {'chunk':>6} {'plan MB/slice':>14} {'time s':>7}")
    for r in rows:
        print(f"{r['slices']:>6} {r['peak_memory_mb']:>12.1f} {r['chunk']:>6} {r['planned_mb_per_slice']:>14} "
              f"{r['wall_s']:>7}")
    for key, label in (("fit_memory_mb", "resident"), ("fit_device_memory_mb", "device")):
        if key in result:
            f = result[key]
            print(f"{label}: {f['slope_mb_per_slice']} MB/slice + {f['intercept_mb']} MB, R² = {f['r2']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
