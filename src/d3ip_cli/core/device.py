"""Device and randomness policy, resolved once at the CLI boundary and passed down."""

from __future__ import annotations

import torch

from d3ip_cli.core.errors import UsageError


def resolve_device(spec: str = "auto") -> torch.device:
    """Map ``auto``/``cpu``/``cuda``/``cuda:N`` to a :class:`torch.device`.

    ``auto`` picks the first CUDA device when one is present, else the CPU. Asking for
    CUDA on a machine without it is a usage error (exit 2), not a silent fallback.
    """
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: CUDA is not available on this machine (use --device cpu)")
        dev = torch.device(spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
        return dev
    raise UsageError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A seeded :class:`torch.Generator` on ``device``; all randomness flows from it."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


PRECISIONS = ("fp32", "bf16", "auto")


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``"auto"`` -> ``"bf16"`` where the device computes bfloat16 natively (CPUs with
    AVX512-BF16/AMX, Ampere or later GPUs), else ``"fp32"``; other values unchanged."""
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    except (AttributeError, RuntimeError):
        return "fp32"
