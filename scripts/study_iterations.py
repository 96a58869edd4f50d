"""How far from convergence are the classical baselines? PSNR of ``tv`` and ``cgls`` against iterations.

A baseline stopped early is a weaker opponent than the method it names. This script builds one
retrospective problem (as ``scripts/study_engine.py`` does) and runs ``tv`` at each weight and
ADMM iteration count given, and ``cgls`` at each iteration count, printing PSNR and wall time
and appending rows to a CSV. The numbers of ``docs/engine_study.md`` §13 come from::

    python scripts/study_iterations.py --volume mni --task sparse-view --views 30 --slices 6:14 \\
        --tv-weights 1e-5,3e-5,1e-4 --tv-iters 30,100,200,300,1000 --csv docs/study/tv_iters_mni.csv
    python scripts/study_iterations.py --volume mni --task cs-mri --slices 6:14 \\
        --tv-weights 3e-4,1e-3,3e-3 --tv-iters 30,100,300 --csv docs/study/tv_iters_mni.csv
    python scripts/study_iterations.py --volume $COLIN27 --task cs-mri --coils 8 --slices 96:104 \\
        --tv-weights 1e-4,3e-4,1e-3 --tv-iters 30,100,200 --cgls-iters 20,100,300 \\
        --csv docs/study/tv_iters_colin27_8coils.csv
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from d3ip_cli.baselines.cgls import cgls
from d3ip_cli.baselines.tv import tv
from d3ip_cli.bench.metrics import volume_metrics
from d3ip_cli.bench.runner import example_path
from d3ip_cli.core.config import ReconConfig
from d3ip_cli.engine.recon import load_problem, to_volume
from study_engine import append_csv  # scripts/ is on sys.path when run as a script


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volume", default="mni", help="mni (the bundled example) or a volume path")
    ap.add_argument("--task", default="sparse-view")
    ap.add_argument("--views", type=int, default=30)
    ap.add_argument("--acceleration", type=float, default=4.0)
    ap.add_argument("--coils", type=int, default=1)
    ap.add_argument("--slices", default=None)
    ap.add_argument("--grid", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tv-weights", default="1e-5,3e-5,1e-4")
    ap.add_argument("--tv-iters", default="30,100,200")
    ap.add_argument("--n-cg", type=int, default=5, help="tv: CG steps per ADMM iteration")
    ap.add_argument("--cgls-iters", default="", help="cgls iteration counts (none by default)")
    ap.add_argument("--csv", default=None, help="append rows to this CSV")
    args = ap.parse_args(argv)

    path = example_path() if args.volume == "mni" else Path(args.volume)
    if path is None:
        raise SystemExit("the bundled example is not in this checkout")
    opts = ({"views": args.views} if args.task != "cs-mri"
            else {"acceleration": args.acceleration, "mask": "uniform1d", "coils": args.coils})
    cfg = ReconConfig(task=args.task, method="cgls", slices=args.slices, grid=args.grid, seed=args.seed, **opts)
    problem = load_problem(path, cfg)
    print(f"# {path.name} {args.task} {opts} slices={args.slices} grid={args.grid}", flush=True)
    rows = []

    def report(method: str, weight: float | None, iters: int, x, seconds: float) -> None:
        m = volume_metrics(to_volume(x, problem, method).data, problem.reference)
        rows.append({"volume": path.name, "task": args.task, "coils": args.coils, "slices": args.slices,
                     "method": method, "weight": "" if weight is None else f"{weight:g}", "iters": iters,
                     "n_cg": args.n_cg if method == "tv" else "", "psnr": round(m["psnr"], 4),
                     "seconds": round(seconds, 1)})
        w = "" if weight is None else f"w={weight:g}"
        print(f"{method:5s} {w:9s} iters={iters:5d}  psnr {m['psnr']:7.3f}  {seconds:6.1f} s", flush=True)

    for n in (int(v) for v in filter(None, args.cgls_iters.split(","))):
        t0 = time.perf_counter()
        x = cgls(problem.op, problem.y, n_iter=n)
        report("cgls", None, n, x, time.perf_counter() - t0)
    for w in (float(v) for v in args.tv_weights.split(",")):
        for n in (int(v) for v in args.tv_iters.split(",")):
            t0 = time.perf_counter()
            x = tv(problem.op, problem.y, weight=w, n_iter=n, n_cg=args.n_cg)
            report("tv", w, n, x, time.perf_counter() - t0)

    if args.csv:
        append_csv(args.csv, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
