"""Distributed helpers for ``torchrun`` (DESIGN §6): slice sharding, gradient all-reduce, gather.

Slices are split into contiguous shards, one per rank. Every rank adapts the *same*
LoRA adapter: gradients are averaged with an all-reduce before each optimiser step, and
since the adapters start identical (seeded) and AdamW is deterministic, they stay
identical. Rank 0 gathers the shards and writes the output. gloo on CPU, NCCL on GPUs.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside torchrun."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: torch.device) -> bool:
    """Initialise the process group when launched by torchrun (``WORLD_SIZE > 1``)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        if device.type == "cuda" and "LOCAL_RANK" in os.environ:  # NCCL binds to the current device
            torch.cuda.set_device(_local_gpu())
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def local_device(device: torch.device) -> torch.device:
    """Under torchrun each rank takes ``cuda:LOCAL_RANK``; CPU stays CPU."""
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        dev = torch.device("cuda", _local_gpu())
        torch.cuda.set_device(dev)
        return dev
    return device


def _local_gpu() -> int:
    from d3ip_cli.core.errors import UsageError

    local, n = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
    if local >= n:
        raise UsageError(f"torchrun local rank {local} has no GPU ({n} visible): use --nproc-per-node {n} or fewer")
    return local


def shard(n: int, rank: int, world_size: int) -> slice:
    """Contiguous shard of ``range(n)`` for ``rank`` (sizes differ by at most one)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def average_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """All-reduce (mean) the gradients of ``params`` across ranks (no-op on one process)."""
    rank, ws = world()
    if ws == 1:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= ws
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def gather_slices(x: torch.Tensor, n_total: int) -> torch.Tensor | None:
    """Gather each rank's ``[z_r, ...]`` shard; rank 0 gets ``[n_total, ...]``, others ``None``."""
    rank, ws = world()
    if ws == 1:
        return x
    import torch.distributed as dist

    if x.is_complex():
        out = gather_slices(torch.view_as_real(x).contiguous(), n_total)
        return None if out is None else torch.view_as_complex(out.contiguous())
    sizes = [shard(n_total, r, ws).stop - shard(n_total, r, ws).start for r in range(ws)]
    zmax = max(sizes)
    pad = torch.zeros((zmax,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    pad[: x.shape[0]] = x
    bufs = [torch.zeros_like(pad) for _ in range(ws)]
    dist.all_gather(bufs, pad)
    if rank != 0:
        return None
    return torch.cat([b[:s] for b, s in zip(bufs, sizes)], 0)


def all_reduce_int(value: int, op: str = "max") -> int:
    """``value`` reduced over ranks (``"max"``, ``"min"`` or ``"sum"``); the value itself on one process."""
    if world()[1] == 1:
        return int(value)
    import torch.distributed as dist

    ops = {"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN, "sum": dist.ReduceOp.SUM}
    t = torch.tensor([int(value)], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=ops[op])
    return int(t.item())


def _comm_device() -> torch.device:
    """Where small collective tensors live: the rank's GPU under NCCL, else the CPU."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if world()[1] > 1:
        import torch.distributed as dist

        dist.barrier()
