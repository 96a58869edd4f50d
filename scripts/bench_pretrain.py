#!/usr/bin/env python
"""Training throughput of ``pretrain-phantom``: seconds per step and images/s of the real training loop.

Runs :func:`d3ip_cli.prior.pretrain.train` (phantom generation, forward, backward, AdamW,
EMA; no checkpoints) for ``--steps`` steps of a preset in a temporary folder, once per
``--precision`` and ``--crop`` asked for, and reports the mean step time after
``--warmup`` steps. Use it to size a preset (images/s at whole images against windows,
float32 against bf16 autocast) on the machine at hand; stop other torch work first.

Usage: python scripts/bench_pretrain.py [--preset cpu] [--precision fp32,bf16] [--crop 0,64]
                                        [--steps 14] [--warmup 4] [--threads 2] [--init PRIOR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch


def measure(preset: str, precision: str, crop: int | None, steps: int, warmup: int,
            init: str | None = None) -> dict:
    from d3ip_cli.prior import pretrain as pt

    cfg = pt.PretrainConfig.from_preset(preset, steps=steps, precision=precision, checkpoint_every=10**9)
    cfg.crop = crop
    cfg.validate()
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as d:
        pt.train(cfg, f"{d}/p.safetensors", progress=lambda info: stamps.append(time.perf_counter()), init=init)
    per_step = (stamps[-1] - stamps[warmup - 1]) / (len(stamps) - warmup)
    return {"preset": preset, "precision": precision, "size": crop or cfg.resolution,
            "batch": cfg.batch_size, "threads": torch.get_num_threads(), "init": init,
            "s_per_step": round(per_step, 3), "images_per_s": round(cfg.batch_size / per_step, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16")
    ap.add_argument("--crop", default="0", help="comma-separated training sizes (0: whole images)")
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--warmup", type=int, default=4, help="steps left out of the timing")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--init", default=None, help="start from these weights (a trained net's activations)")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    if not 0 < args.warmup < args.steps:
        ap.error("--warmup must be between 1 and --steps - 1")
    torch.set_num_threads(args.threads)
    rows = []
    for crop in (int(c) or None for c in args.crop.split(",")):
        for precision in args.precision.split(","):
            row = measure(args.preset, precision, crop, args.steps, args.warmup, args.init)
            rows.append(row)
            print(f"{row['preset']:>5} {row['size']:>4}² {precision:>4}  batch {row['batch']}  "
                  f"{row['threads']} thread(s)  {row['s_per_step']:.2f} s/step  {row['images_per_s']:.1f} images/s",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
