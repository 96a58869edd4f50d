"""Bundle a trained prior as the package's default prior, with its training record.

Usage::

    python scripts/bundle_prior.py training/prior_cpu/phantom_cpu.safetensors

Writes ``src/d3ip_cli/prior/weights/phantom_cpu.safetensors`` (the EMA weights stored
as float16 to keep the wheel small; they are loaded as float32) and
``src/d3ip_cli/prior/weights/phantom_cpu.json`` (the training record: command line,
steps, images seen, wall time, throughput, loss summary, SHA-256 of the source file),
and copies the loss-curve and sample-grid PNGs beside the record under ``docs/prior/``.

It also slims the training state beside the source (drops the AdamW moments, and with
``--ema-only`` the live weights too, see :func:`d3ip_cli.prior.pretrain.slim_state`) so it
can be committed for the next ``--resume``; ``--keep-full-state`` leaves it as it is. A prior
trained in stages (``pretrain-phantom --init``) records its parent's summary under ``init``
and the images of all stages under ``images_seen_total``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from d3ip_cli.prior import checkpoint as ckpt
from d3ip_cli.prior.pretrain import totals

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path, help="prior file written by d3ip pretrain-phantom")
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--keep-full-state", action="store_true", help="do not drop the optimiser moments")
    ap.add_argument("--ema-only", action="store_true",
                    help="also drop the live weights from the state (a quarter of its size; resume restarts them from the EMA)")
    args = ap.parse_args(argv)
    if args.ema_only and args.keep_full_state:
        ap.error("--ema-only slims the state; --keep-full-state keeps it: use one of them")
    model, meta = ckpt.load_prior(args.source)
    weights = ROOT / "src/d3ip_cli/prior/weights"
    weights.mkdir(parents=True, exist_ok=True)
    out = weights / "phantom_cpu.safetensors"
    bundled_meta = {k: v for k, v in meta.items() if k not in ("sha256", "path", "format", "architecture", "weights_dtype")}
    bundled_meta["source_sha256"] = meta["sha256"]
    ckpt.save_prior(out, model, bundled_meta, dtype=getattr(torch, args.dtype))
    _, check = ckpt.load_prior(out)
    stem = args.source.name[: -len(".safetensors")]
    record = {
        "prior": str(out.relative_to(ROOT)),
        "sha256": check["sha256"],
        "source": str(args.source),
        "source_sha256": meta["sha256"],
        "command": " ".join(meta.get("training", {}).get("argv", [])) or None,
        "preset": meta.get("preset"),
        "steps": meta.get("steps"),
        "images_seen": meta.get("images_seen"),
        "training_wall_time_s": meta.get("wall_time_s"),
        "images_per_s": round(meta["images_seen"] / meta["wall_time_s"], 2) if meta.get("wall_time_s") else None,
        "loss": meta.get("loss"),
        "init": meta.get("init"),
        "total": totals(meta),  # steps, images and wall time over all training stages
        "architecture": meta.get("architecture"),
        "parameters": sum(p.numel() for p in model.parameters()),
        "data": meta.get("data"),
        "stored_dtype": args.dtype,
    }
    (weights / "phantom_cpu.json").write_text(json.dumps(record, indent=2) + "\n")
    docs = ROOT / "docs/prior"
    docs.mkdir(parents=True, exist_ok=True)
    for suffix in (".loss.png", ".samples.png"):
        src = args.source.parent / f"{stem}{suffix}"
        if src.exists():
            shutil.copy2(src, docs / f"phantom_cpu{suffix}")
    from d3ip_cli.prior.pretrain import slim_state, state_path

    state = state_path(args.source)
    if state.exists() and not args.keep_full_state:
        slim_state(state, state, ema_only=args.ema_only)
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
