#!/usr/bin/env python
"""Benchmark the native CT projector against astra-toolbox's CPU projector.

Times forward + adjoint (back-projection) of a batch of slices with the same geometry
(parallel beam, Joseph/``linear`` kernel) and prints the median of several repeats, the
ratio native/astra (below 1: native is faster) and the one-time matrix build cost.
Not a timed test: run it by hand (``make bench``).

Usage: python scripts/bench_projector.py [--slices 16] [--size 256] [--views 60] [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=16)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--views", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from d3ip_cli.physics.checks import phantom
    from d3ip_cli.physics.ct import joseph_matrix
    from d3ip_cli.physics.registry import backend_status, make_operator

    shape = (args.slices, args.size, args.size)
    x = torch.from_numpy(np.repeat(phantom(args.size)[None], args.slices, 0)).float()
    joseph_matrix.cache_clear()
    t = time.perf_counter()
    native = make_operator("sparse-view", shape, views=args.views, backend="native")
    native.matrices(x.device, x.dtype)
    build = time.perf_counter() - t
    y = native.A(x)
    res = {"slices": args.slices, "size": args.size, "views": args.views, "threads": torch.get_num_threads(),
           "native_build_s": round(build, 3)}
    res["native_fwd_s"] = _median_time(lambda: native.A(x), args.repeats)
    res["native_adj_s"] = _median_time(lambda: native.A_adjoint(y), args.repeats)
    res["native_s"] = res["native_fwd_s"] + res["native_adj_s"]
    if backend_status()["astra"] is None:
        astra_op = make_operator("sparse-view", shape, views=args.views, backend="astra")
        res["astra_fwd_s"] = _median_time(lambda: astra_op.A(x), args.repeats)
        res["astra_adj_s"] = _median_time(lambda: astra_op.A_adjoint(y), args.repeats)
        res["astra_s"] = res["astra_fwd_s"] + res["astra_adj_s"]
        res["ratio_native_over_astra"] = res["native_s"] / res["astra_s"]
        with torch.no_grad():
            res["max_rel_diff"] = float((astra_op.A(x) - y).norm() / y.norm())
    else:
        res["astra"] = backend_status()["astra"]
    res = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in res.items()}
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{args.slices} slices of {args.size}^2, {args.views} views, {res['threads']} torch threads")
        print(f"native: forward {res['native_fwd_s']:.4f} s + adjoint {res['native_adj_s']:.4f} s = "
              f"{res['native_s']:.4f} s  (one-time matrix build {res['native_build_s']:.2f} s)")
        if "astra_s" in res:
            print(f"astra : forward {res['astra_fwd_s']:.4f} s + adjoint {res['astra_adj_s']:.4f} s = {res['astra_s']:.4f} s")
            print(f"ratio native/astra = {res['ratio_native_over_astra']:.3f}  (target <= 2; relative difference "
                  f"of the sinograms {res['max_rel_diff']:.1e})")
        else:
            print(f"astra : not available ({res['astra']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
