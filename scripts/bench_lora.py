#!/usr/bin/env python
"""Throughput of one adaptation step's network pass: the merged LoRA kernel against the two-path form.

d3ip's adaptation step runs the adapted U-Net forward on a minibatch of slices and
back-propagates to the LoRA factors only (base weights frozen). An adapted layer computes
``W x + s U(D x)`` with ``D`` of rank ``r`` and the base layer's kernel and ``U`` 1x1;
``d3ip_cli.engine.lora`` runs it as one convolution with the merged kernel ``W + s U D``
(exact, since ``U`` is 1x1), where the reference runs ``D`` and ``U`` as two more
convolutions. This script times both forms on the same network, interleaved (so that other
load on the machine disturbs both alike), and checks that they agree.

For each precision (float32, and bfloat16 autocast as ``--precision auto`` uses where the CPU
computes it natively) and minibatch size it reports images per second (forward + backward to
the adapter, the best of ``--repeats``) and the relative differences of output and gradients.

Usage: python scripts/bench_lora.py [--prior P] [--size 128] [--batch 1,2,4,8] [--rank 4]
                                    [--threads 2] [--repeats 5] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch


def _two_path(self, x):  # the reference's form: W x + s U(D x)
    return self.base(x) + self.scale * self.up(self.down(x))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prior", default=None, help="prior (.safetensors); default: the bundled one")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", default="1,2,4,8", help="comma-separated minibatch sizes")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from d3ip_cli.engine import lora
    from d3ip_cli.engine.diffusion import Autocast, load_prior_for, resolve_precision

    model, meta = load_prior_for(args.prior, torch.device("cpu"))
    params = lora.inject_lora(model, rank=args.rank)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    with torch.no_grad():  # an adapter some way into a run (a zero U would make D's gradient 0)
        g = torch.Generator().manual_seed(0)
        for p in params:
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    merged_conv, merged_linear = lora.LoRAConv2d.forward, lora.LoRALinear.forward
    forms = {"merged": (merged_conv, merged_linear), "two-path": (_two_path, _two_path)}
    precisions = ["fp32"] + (["bf16"] if resolve_precision("auto", torch.device("cpu")) == "bf16" else [])

    def step(form: str, bf16: bool, x: torch.Tensor, t: torch.Tensor):
        lora.LoRAConv2d.forward, lora.LoRALinear.forward = forms[form]
        net = Autocast(model, bf16)
        for p in params:
            p.grad = None
        t0 = time.perf_counter()
        out = net(x, t)
        out.square().mean().backward()
        return time.perf_counter() - t0, out.detach(), [p.grad.clone() for p in params]

    rows = []
    try:
        for prec in precisions:
            for b in [int(v) for v in args.batch.split(",")]:
                x = torch.randn(b, 1, args.size, args.size, generator=torch.Generator().manual_seed(1))
                t = torch.full((b,), 30, dtype=torch.long)
                times: dict[str, list[float]] = {f: [] for f in forms}
                res = {}
                for r in range(args.repeats + 1):  # the first round warms up
                    for f in forms:
                        dt, out, grads = step(f, prec == "bf16", x, t)
                        if r:
                            times[f].append(dt)
                        res[f] = (out, grads)
                (o1, g1), (o2, g2) = res["merged"], res["two-path"]
                row = {"precision": prec, "batch": b, "size": args.size, "rank": args.rank, "threads": args.threads,
                       **{f"{f}_img_per_s": round(b / min(times[f]), 3) for f in forms},
                       "speedup": round(min(times["two-path"]) / min(times["merged"]), 3),
                       "out_rel_diff": float((o1 - o2).norm() / o2.norm()),
                       "grad_rel_diff_max": max(float((a - c).norm() / c.norm()) for a, c in zip(g1, g2))}
                rows.append(row)
                print(f"{prec} batch {b}: merged {row['merged_img_per_s']:.2f} img/s, two-path "
                      f"{row['two-path_img_per_s']:.2f} img/s ({row['speedup']:.2f}x); relative difference: output "
                      f"{row['out_rel_diff']:.1e}, gradients {row['grad_rel_diff_max']:.1e}", flush=True)
    finally:
        lora.LoRAConv2d.forward, lora.LoRALinear.forward = merged_conv, merged_linear
    if args.json:
        doc = {"command": " ".join(["python", "scripts/bench_lora.py", *(argv if argv is not None else sys.argv[1:])]),
               "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
               "architecture": meta.get("architecture"), "rows": rows}
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
