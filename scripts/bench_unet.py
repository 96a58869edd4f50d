#!/usr/bin/env python
"""U-Net forward and forward+backward throughput as a fraction of this machine's float32 matmul throughput.

1. Measures dense float32 matrix multiplication (``torch.mm`` of ``N x N`` matrices,
   ``2 N^3`` FLOP each): the machine's practical peak for the kernels the U-Net is made of.
2. Counts the U-Net's FLOP with ``torch.utils.flop_counter.FlopCounterMode`` (convolutions
   and matrix products, forward and backward; GroupNorm/SiLU/additions are memory-bound
   and not counted), then times the forward pass (``torch.no_grad``, as in sampling) and a
   forward + backward pass (all weights and the input require gradients: an upper bound of
   the adaptation step, which back-propagates to the input and the LoRA factors only).
3. Reports images/s, achieved GFLOP/s and the fraction of the matmul GFLOP/s. Times are the
   fastest of ``--repeats`` calls by default (``--stat median`` for the median), for the
   matmul and the network alike, so other load on the machine disturbs both the same way.

``--precision bf16`` runs the network under ``torch.autocast(dtype=bfloat16)``, as
``pretrain-phantom --precision bf16`` trains (the percentages stay relative to the float32
matmul, so they can exceed 100%).

The weights do not matter for speed: the architecture comes from ``--prior`` (default: the
bundled prior when present) or ``--preset`` (``tiny``, ``cpu``, ``paper``); weights are random.

Usage: python scripts/bench_unet.py [--prior P | --preset cpu] [--batch 8] [--size 64] [--threads 1]
                                    [--matmul 1024] [--repeats 10] [--stat min] [--device cpu] [--json]
                                    [--precision fp32|bf16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


STAT = {"min": min, "median": statistics.median}


def timed(fn, repeats: int, dev: torch.device, stat: str = "min") -> float:
    """Seconds per call: the fastest of ``repeats`` (``min``: least disturbed by other load) or the median."""
    fn()  # warm-up
    _sync(dev)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t)
    return STAT[stat](times)


def matmul_gflops(n: int, repeats: int, dev: torch.device, stat: str = "min") -> float:
    a = torch.randn(n, n, device=dev)
    b = torch.randn(n, n, device=dev)
    t = timed(lambda: torch.mm(a, b), repeats, dev, stat)
    return 2 * n**3 / t / 1e9


def architecture(prior: str | None, preset: str | None) -> tuple[dict, str]:
    from d3ip_cli.prior.checkpoint import bundled_prior_path, read_metadata
    from d3ip_cli.prior.pretrain import PRESETS

    if preset:
        return dict(PRESETS[preset]["architecture"]), f"preset {preset}"
    path = prior or (str(bundled_prior_path()) if bundled_prior_path().exists() else None)
    if path is None:
        return dict(PRESETS["cpu"]["architecture"]), "preset cpu (no bundled prior found)"
    return dict(read_metadata(path)["architecture"]), f"prior {path}"


def count_flops(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> tuple[int, int]:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        with torch.no_grad():
            model(x, t)
    fwd = fc.get_total_flops()
    xg = x.clone().requires_grad_(True)
    with FlopCounterMode(display=False) as fc:
        model(xg, t).square().mean().backward()
    return fwd, fc.get_total_flops()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prior", default=None, help="take the architecture from this prior file")
    ap.add_argument("--preset", default=None, choices=["tiny", "cpu", "paper"], help="or from a pretraining preset")
    ap.add_argument("--batch", type=int, default=8, help="slices per network call")
    ap.add_argument("--size", type=int, default=64, help="slice side in pixels")
    ap.add_argument("--matmul", type=int, default=1024, help="N of the N x N matmul reference")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--stat", default="min", choices=["min", "median"], help="time per call: fastest or median repeat")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast the network")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)

    from d3ip_cli.prior.network import UNet, UNetConfig

    arch, source = architecture(args.prior, args.preset)
    torch.manual_seed(0)
    model = UNet(UNetConfig.from_dict(arch)).to(dev).eval()
    x = torch.randn(args.batch, 1, args.size, args.size, device=dev)
    t = torch.randint(0, 1000, (args.batch,), device=dev)
    flops_fwd, flops_fb = count_flops(model, x, t)

    def cast():
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def fwd():
        with torch.no_grad(), cast():
            model(x, t)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(True)
        with cast():
            out = model(xg, t)
        out.float().square().mean().backward()

    mm = matmul_gflops(args.matmul, args.repeats, dev, args.stat)
    t_f = timed(fwd, args.repeats, dev, args.stat)
    t_fb = timed(fwd_bwd, args.repeats, dev, args.stat)
    res = {
        "architecture_from": source, "parameters": sum(p.numel() for p in model.parameters()),
        "batch": args.batch, "size": args.size, "device": str(dev), "precision": args.precision, "threads": torch.get_num_threads(),
        "stat": args.stat, "matmul_n": args.matmul, "matmul_gflops": mm,
        "gflop_per_image_fwd": flops_fwd / args.batch / 1e9, "gflop_per_image_fwd_bwd": flops_fb / args.batch / 1e9,
        "fwd_s": t_f, "fwd_images_per_s": args.batch / t_f, "fwd_gflops": flops_fwd / t_f / 1e9,
        "fwd_bwd_s": t_fb, "fwd_bwd_images_per_s": args.batch / t_fb, "fwd_bwd_gflops": flops_fb / t_fb / 1e9,
    }
    res["fwd_fraction_of_matmul"] = res["fwd_gflops"] / mm
    res["fwd_bwd_fraction_of_matmul"] = res["fwd_bwd_gflops"] / mm
    res = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"U-Net ({source}, {res['parameters'] / 1e6:.2f} M parameters), batch {args.batch} x {args.size}^2, "
          f"{res['device']}, {res['threads']} torch thread(s), {args.precision}")
    print(f"float32 matmul {args.matmul}^2: {mm:.1f} GFLOP/s")
    print(f"forward         : {res['fwd_images_per_s']:8.1f} images/s  {res['fwd_gflops']:7.1f} GFLOP/s  "
          f"= {100 * res['fwd_fraction_of_matmul']:.0f}% of matmul  ({res['gflop_per_image_fwd']:.3f} GFLOP/image)")
    print(f"forward+backward: {res['fwd_bwd_images_per_s']:8.1f} images/s  {res['fwd_bwd_gflops']:7.1f} GFLOP/s  "
          f"= {100 * res['fwd_bwd_fraction_of_matmul']:.0f}% of matmul  ({res['gflop_per_image_fwd_bwd']:.3f} GFLOP/image)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
