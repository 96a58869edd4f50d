"""Phantom pretraining of the prior: ``d3ip pretrain-phantom`` (DESIGN §5).

Denoising score matching on phantoms generated on the fly: for a batch :math:`x_0`
of phantoms mapped to ``[-1, 1]``, random steps :math:`t` and noise :math:`\\epsilon`,
minimise the squared error of the network's head against its target with AdamW,
gradient clipping and an EMA of the weights: :math:`\\lVert \\epsilon_\\theta(x_t, t) - \\epsilon \\rVert^2`
for an ε head, :math:`\\lVert v_\\theta(x_t, t) - v \\rVert^2` with
:math:`v = \\sqrt{\\bar\\alpha_t}\\,\\epsilon - \\sqrt{1-\\bar\\alpha_t}\\,x_0` for a v head
(:mod:`d3ip_cli.prior.network`). ``precision="bf16"`` runs the forward pass under
``torch.autocast(bfloat16)``; ``"auto"`` picks it where the device supports bfloat16.

Every random draw of step ``s`` on rank ``r`` comes from a generator seeded with
``(seed, s, r)``, so ``--resume`` continues *exactly*: the weights after N + N resumed
steps equal those of an uninterrupted 2N-step run. Under ``torchrun`` the model is
wrapped in DistributedDataParallel (gloo on CPU, NCCL on GPUs) and rank 0 writes.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from d3ip_cli import __version__
from d3ip_cli.core.device import PRECISIONS, resolve_precision
from d3ip_cli.core.errors import InputDataError, UsageError
from d3ip_cli.prior import checkpoint as ckpt
from d3ip_cli.prior import phantoms, schedule
from d3ip_cli.prior.network import UNet, UNetConfig

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "architecture": {"model_channels": 16, "channel_mult": (1, 2), "num_res_blocks": 1, "attention_levels": (),
                         "num_heads": 2, "num_groups": 4},
        "resolution": 32, "crop": None, "batch_size": 8, "steps": 20, "lr": 1e-3, "warmup": 5, "ema_decay": 0.99,
        "checkpoint_every": 10, "sample_every": 0,
    },
    "cpu": {
        # Sized by measurement on a 2-core CPU (scripts/bench_pretrain.py): this 2.3M-parameter
        # net trains on whole 128x128 phantoms at ~6 images/s with bf16 autocast (~2 in
        # float32) on an AVX512-BF16 CPU. Whole images, not windows, so that the net learns a phantom's layout; the
        # v head keeps the high-noise steps, which set that layout, exact (network.py).
        "architecture": {"model_channels": 32, "channel_mult": (1, 2, 2, 2), "num_res_blocks": 2,
                         "attention_levels": (), "num_heads": 4, "num_groups": 8, "prediction": "v"},
        "resolution": 128, "crop": None, "batch_size": 16, "steps": 200_000, "lr": 5e-4, "warmup": 500,
        "ema_decay": 0.999, "checkpoint_every": 100, "sample_every": 1000, "precision": "auto",
    },
    "paper": {
        "architecture": {"model_channels": 128, "channel_mult": (1, 1, 2, 2, 4, 4), "num_res_blocks": 2,
                         "attention_levels": (4,), "num_heads": 4, "num_groups": 32},
        "resolution": 256, "crop": None, "batch_size": 32, "steps": 300_000, "lr": 1e-4, "warmup": 1000,
        "ema_decay": 0.9999, "checkpoint_every": 2000, "sample_every": 10_000, "precision": "auto",
    },
}


@dataclass
class PretrainConfig:
    """Everything that determines a training run (stored in the checkpoint header)."""

    preset: str = "tiny"
    architecture: dict = field(default_factory=dict)
    resolution: int = 32
    crop: int | None = None
    batch_size: int = 8
    steps: int = 20
    lr: float = 1e-3
    warmup: int = 5
    anneal: int = 0  # cosine-decay the learning rate to 0 over the last `anneal` steps (0: constant)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.99
    seed: int = 0
    checkpoint_every: int = 10
    sample_every: int = 0
    precision: str = "fp32"  # "bf16": autocast the forward pass (AdamW, EMA and the loss stay float32)
    recipe: dict = field(default_factory=lambda: {"frac_3d": 0.5, "mean_count_2d": 140.0, "mean_count_3d": 250.0,
                                                  "size_scale": phantoms.SIZE_SCALE})

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> "PretrainConfig":
        if preset not in PRESETS:
            raise UsageError(f"--preset {preset!r}: expected one of {', '.join(PRESETS)}")
        values = {k: v for k, v in PRESETS[preset].items()}
        values.update({k: v for k, v in overrides.items() if v is not None})
        cfg = cls(preset=preset, **values)
        cfg.validate()
        return cfg

    def unet_config(self) -> UNetConfig:
        return UNetConfig.from_dict(self.architecture)

    def validate(self) -> None:
        if self.steps < 1:
            raise UsageError(f"--steps must be positive, got {self.steps}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be positive, got {self.batch_size}")
        if self.resolution < 8:
            raise UsageError(f"--resolution must be at least 8, got {self.resolution}")
        if self.crop is not None and not 0 <= self.crop <= self.resolution:
            raise UsageError(f"--crop {self.crop}: a training window must be 0 (whole images) to --resolution "
                             f"{self.resolution} pixels")
        f = self.unet_config().downsampling_factor
        train_size = self.crop or self.resolution
        if self.resolution % f or train_size % f:
            raise UsageError(f"--resolution {self.resolution} (training size {train_size}) is not divisible by the "
                             f"network's downsampling factor {f}")
        if not 0 <= self.anneal <= self.steps:
            raise UsageError(f"--anneal must be between 0 and --steps ({self.steps}), got {self.anneal}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")

    def recipe_full(self) -> dict:
        return dict(self.recipe, crop=self.crop)

    def identity(self) -> dict:
        """The settings a resumed run must share with the run it continues."""
        return {"architecture": self.unet_config().to_dict(), "resolution": self.resolution, "crop": self.crop,
                "batch_size": self.batch_size, "lr": self.lr, "warmup": self.warmup, "anneal": self.anneal,
                # an annealed schedule ends at --steps, so a resumed annealed run must keep them
                "anneal_end": self.steps if self.anneal else None,
                "seed": self.seed,
                "ema_decay": self.ema_decay, "grad_clip": self.grad_clip, "weight_decay": self.weight_decay,
                "recipe": self.recipe, "precision": self.precision}


def state_path(output: str | os.PathLike) -> Path:
    """``prior.safetensors`` -> ``prior.state.safetensors`` (the resumable training state)."""
    p = Path(output)
    stem = p.name[: -len(".safetensors")] if p.name.endswith(".safetensors") else p.name
    return p.parent / f"{stem}.state.safetensors"


def _step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((int(seed) * 1_000_003 + step * 7919 + rank * 104_729) % (2**63 - 1))
    return g


def _dist_info() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> bool:
    """Initialise torch.distributed from torchrun's environment; True when it did."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return True


def _optimizer_tensors(opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for i, p in enumerate(params):
        st = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in st:
                v = st[key]
                out[f"optim.{i}.{key}"] = v if torch.is_tensor(v) else torch.tensor(float(v))
    return out


def _load_optimizer(opt: torch.optim.Optimizer, params: list[nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
    for i, p in enumerate(params):
        st = {}
        for key in ("exp_avg", "exp_avg_sq", "step"):
            name = f"optim.{i}.{key}"
            if name in tensors:
                st[key] = tensors[name].to(p.device) if key != "step" else tensors[name].clone()
        if st:
            opt.state[p] = st


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up, then constant; with ``cfg.anneal`` a cosine decay to 0 over the last steps."""
    lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
    decay_start = cfg.steps - cfg.anneal
    if cfg.anneal and step >= decay_start:
        lr *= 0.5 * (1.0 + math.cos(math.pi * (step - decay_start) / cfg.anneal))
    return lr


def ema_rate(step: int, decay: float) -> float:
    """EMA decay with the usual warm-up ``min(decay, (1 + s) / (10 + s))``."""
    return min(decay, (1 + step) / (10 + step))


def train(
    cfg: PretrainConfig,
    output: str | os.PathLike,
    *,
    resume: bool = False,
    device: torch.device | str = "cpu",
    progress: Callable[[dict], None] | None = None,
    on_checkpoint: Callable[[int, UNet, dict], None] | None = None,
    argv: list[str] | None = None,
    init: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Train (or continue training) the prior; write ``output`` (EMA weights) and its state file.

    Args:
        cfg: the run's settings.
        output: the prior file to write (``.safetensors``); the state goes to :func:`state_path`.
        resume: continue from the state file (refused when its settings differ).
        device: where to train; under ``torchrun`` each rank passes its own device.
        progress: called every step with ``{"step", "steps", "loss", "images_per_s"}``.
        on_checkpoint: called on rank 0 after each checkpoint with (step, EMA model, metadata),
            e.g. to draw a sample grid.
        init: start a new run (a new *stage*) from the EMA weights of this prior file, which
            must have the same architecture: e.g. whole-image training after training on
            crops. The parent's training summary is kept in the metadata under ``"init"``
            (and its images in ``"images_seen_total"``); the optimiser starts fresh.

    Returns:
        The metadata of the final checkpoint.
    """
    device = torch.device(device)
    cfg.precision = resolve_precision(cfg.precision, device)
    rank, world = _dist_info()
    unet_cfg = cfg.unet_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = UNet(unet_cfg).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    abar = schedule.alphas_cumprod().to(device)
    losses: list[float] = []
    start, wall_before = 0, 0.0
    lineage: dict[str, Any] | None = None
    # a stage started with --init draws its phantoms after its parents' (same seed, later steps),
    # so it never repeats them; stored in the state so --resume continues the same stream
    data_offset = 0

    spath = state_path(output)
    if init is not None and resume:
        raise UsageError("--init starts a new run; a resumed run continues from its own state")
    if init is not None:
        lineage = _load_init(init, model, ema, cfg, device)
        data_offset = totals(lineage)["steps"]
    if resume:
        if not spath.exists():
            raise InputDataError(f"--resume: no training state at {spath} (start without --resume)")
        tensors, meta = ckpt.load_tensors(spath)
        theirs, ours = stored_identity(meta, spath), _jsonable(cfg.identity())
        if theirs != ours:
            diff = ", ".join(f"{k} {theirs.get(k)!r} (now {ours.get(k)!r})" for k in ours if theirs.get(k) != ours.get(k))
            raise InputDataError(f"--resume: {spath} was written with different settings ({diff}); "
                                 "refusing to mix runs")
        was = int((meta.get("training") or {}).get("world_size", 1))
        if was != world:  # the images per step (batch x processes) would change, and the count of images seen
            raise InputDataError(f"--resume: {spath} was trained by {was} process(es), this run has {world}: "
                                 f"resume with {was} (torchrun --nproc-per-node {was})" if was > 1 else
                                 f"--resume: {spath} was trained by 1 process, this run has {world}: resume without torchrun")
        has_live = any(k.startswith("model.") for k in tensors)  # an EMA-only slim state has none
        try:
            if has_live:
                model.load_state_dict({k[6:]: v.to(device) for k, v in tensors.items() if k.startswith("model.")})
            ema.load_state_dict({k[4:]: v.to(device) for k, v in tensors.items() if k.startswith("ema.")})
        except RuntimeError as exc:
            raise InputDataError(f"--resume: {spath} does not match the architecture: {str(exc).splitlines()[0]}") from None
        _load_optimizer(opt, params, tensors)
        if not has_live:  # restart the live weights from the EMA
            model.load_state_dict(ema.state_dict())
        losses = tensors["loss_history"].tolist() if "loss_history" in tensors else []
        lineage = meta.get("init")
        data_offset = int(meta.get("data_step_offset", 0))
        start = int(meta["steps"])
        if start > cfg.steps:  # its weights are past the asked end; no prior of --steps steps can come from it
            raise UsageError(f"--resume: {spath} holds {start} steps, more than --steps {cfg.steps}: give --steps "
                             f"{start} to write its prior again, or more to train on")
        wall_before = float(meta.get("wall_time_s", 0.0))
        if start >= cfg.steps:  # trained to the end before: write again what the end of a run writes
            prior_meta = {k: v for k, v in meta.items() if k not in ("format", "identity")}
            if rank == 0:
                ckpt.save_prior(output, ema, prior_meta)
                done_meta = dict(prior_meta, architecture=model.config.to_dict())
                if on_checkpoint is not None:
                    on_checkpoint(start, ema, done_meta)
                return done_meta
            return meta

    net: nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        for p in model.parameters():  # identical start on every rank
            torch.distributed.broadcast(p.data, src=0)
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    t0 = time.perf_counter()
    last = t0
    meta: dict[str, Any] = {}
    model.train()
    for step in range(start, cfg.steps):
        g = _step_generator(cfg.seed, data_offset + step, rank, device)
        x0 = phantoms.training_batch(cfg.batch_size, cfg.resolution, generator=g, recipe=cfg.recipe_full()) * 2 - 1
        t = torch.randint(0, schedule.NUM_STEPS, (x0.shape[0],), generator=g, device=device)
        noise = torch.randn(x0.shape, generator=g, device=device)
        xt = schedule.q_sample(x0, t, noise, abar)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            out = net(xt, t, raw=True)
        loss = (out.float() - model.target(x0, noise, t)).pow(2).mean()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            r = ema_rate(step, cfg.ema_decay)
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.mul_(r).add_(pm.detach(), alpha=1 - r)
        loss_v = float(loss.detach())
        if world > 1:
            lt = torch.tensor([loss_v], device=device)
            torch.distributed.all_reduce(lt)
            loss_v = float(lt) / world
        losses.append(loss_v)
        now = time.perf_counter()
        if progress is not None:
            progress({"step": step + 1, "steps": cfg.steps, "loss": loss_v,
                      "images_per_s": cfg.batch_size * world / max(now - last, 1e-9)})
        last = now
        done = step + 1
        if rank == 0 and (done % max(1, cfg.checkpoint_every) == 0 or done == cfg.steps):
            meta = _checkpoint(cfg, output, model, ema, opt, params, losses, done, world,
                               wall_before + now - t0, argv, lineage, data_offset, final=done == cfg.steps)
            if on_checkpoint is not None and (cfg.sample_every and done % cfg.sample_every == 0 or done == cfg.steps):
                on_checkpoint(done, ema, meta)
    if world > 1:
        dump = os.environ.get("D3IP_DUMP_PARAMS")
        if dump:  # test hook: every rank writes its live parameters
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                      dump.format(rank=rank))
        torch.distributed.barrier()
    return meta


def _arch_config(d: dict, path: str | os.PathLike) -> UNetConfig:
    try:
        return UNetConfig.from_dict(d)
    except (TypeError, ValueError) as exc:
        raise InputDataError(f"{path}: unusable architecture in its header ({exc})") from None


def stored_identity(meta: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """The settings a training state was written with, comparable with
    ``_jsonable(cfg.identity())``: states written before a field existed hold its default
    (an ε head, constant learning rate) or, for the precision, what their record says."""
    ident = dict(meta.get("identity") or {})
    ident.setdefault("precision", (meta.get("training") or {}).get("precision", "fp32"))
    ident.setdefault("anneal", 0)
    ident.setdefault("anneal_end", None)
    if "architecture" in ident:
        ident["architecture"] = _jsonable(_arch_config(ident["architecture"], path).to_dict())
    return ident


def check_init(path: str | os.PathLike, cfg: PretrainConfig) -> None:
    """Refuse, before any work, an ``--init`` file that cannot start this run (exit 3)."""
    _init_parent(path, UNetConfig.from_dict(cfg.architecture))


def _load_init(path: str | os.PathLike, model: UNet, ema: UNet, cfg: PretrainConfig,
               device: torch.device) -> dict[str, Any]:
    """Copy the EMA weights of a prior file (or of a training state) into ``model`` and ``ema``;
    return the parent's training summary."""
    parent, meta = _init_parent(path, model.config)
    with torch.no_grad():
        model.load_state_dict(parent.state_dict())
        ema.load_state_dict(parent.state_dict())
    keep = ("sha256", "preset", "resolution", "steps", "images_seen", "wall_time_s", "loss", "init")
    summary = {k: meta.get(k) for k in keep if k in meta}
    summary["crop"] = (meta.get("data") or {}).get("recipe", {}).get("crop")
    summary["file"] = Path(path).name
    summary["prediction"] = parent.config.prediction  # a head change shows as parent eps -> child v
    return _jsonable(summary)


def _init_parent(path: str | os.PathLike, config: UNetConfig) -> tuple[UNet, dict[str, Any]]:
    """The ``--init`` parent (a prior file's weights, or a training state's EMA) and its header,
    refused (exit 3) when its architecture cannot start a net of ``config``."""
    if ckpt.read_metadata(path).get("format") == "d3ip-train-state":
        tensors, meta = ckpt.load_tensors(path)
        arch = _arch_config((meta.get("identity") or {}).get("architecture") or {}, path)
        parent = UNet(arch)
        try:
            parent.load_state_dict({k[4:]: v.float() for k, v in tensors.items() if k.startswith("ema.")})
        except RuntimeError:
            raise InputDataError(f"--init {path}: its EMA weights do not match its own architecture") from None
        meta = dict(meta, sha256=ckpt.file_sha256(path),
                    data={"recipe": (meta.get("identity") or {}).get("recipe", {}) | {"crop": meta["identity"].get("crop")}})
    else:
        parent, meta = ckpt.load_prior(path)
    # The head (what the last layer predicts) may change: an ε net is a v net's good start at
    # low noise, where v ≈ ε, and has the same weights; everything else must match.
    a, b = parent.config.to_dict(), config.to_dict()
    diff = ", ".join(f"{k} {a.get(k)} vs {b.get(k)}" for k in b if a.get(k) != b.get(k) and k != "prediction")
    if diff:
        raise InputDataError(f"--init {path}: its architecture differs from the preset's ({diff})")
    return parent, meta


def totals(meta: dict[str, Any]) -> dict[str, Any]:
    """Steps, images and training wall time of a prior over all its stages (``--init`` chain)."""
    steps, images, wall = int(meta.get("steps") or 0), int(meta.get("images_seen") or 0), float(meta.get("wall_time_s") or 0)
    stages, parent = 1, meta.get("init")
    while parent:
        steps += int(parent.get("steps") or 0)
        images += int(parent.get("images_seen") or 0)
        wall += float(parent.get("wall_time_s") or 0)
        stages, parent = stages + 1, parent.get("init")
    return {"steps": steps, "images_seen": images, "wall_time_s": round(wall, 2), "stages": stages}


def _jsonable(d: Any) -> Any:
    import json

    return json.loads(json.dumps(d))


def loss_summary(losses: list[float], window: int = 500) -> dict[str, Any]:
    if not losses:
        return {}
    tail = losses[-window:]
    return {"first": losses[0], "last": losses[-1], "mean_last": sum(tail) / len(tail), "window": len(tail),
            "min_running_mean": min(sum(losses[i:i + window]) / len(losses[i:i + window])
                                    for i in range(0, len(losses), window))}


def _checkpoint(cfg: PretrainConfig, output: str | os.PathLike, model: UNet, ema: UNet, opt: torch.optim.Optimizer,
                params: list[nn.Parameter], losses: list[float], steps: int, world: int, wall: float,
                argv: list[str] | None, lineage: dict[str, Any] | None = None,
                data_offset: int = 0, final: bool = True) -> dict[str, Any]:
    """Save the training state; at the ``final`` step also the prior itself (the output exists only
    once training reached ``--steps``, so an interrupted run leaves no prior that looks finished)."""
    meta = {
        "version": __version__,
        "schedule": schedule.schedule_metadata(),
        "resolution": cfg.resolution,
        "prediction": cfg.unet_config().prediction,
        "data_range": [0.0, 1.0],
        "model_range": [-1.0, 1.0],
        "data": {"generator": "d3ip_cli.prior.phantoms.training_batch", "recipe": cfg.recipe_full(), "seed": cfg.seed,
                 "real_images": False},
        "preset": cfg.preset,
        "training": {"batch_size": cfg.batch_size, "world_size": world, "precision": cfg.precision, "lr": cfg.lr, "warmup": cfg.warmup,
                     "anneal": cfg.anneal,
                     "ema_decay": cfg.ema_decay, "grad_clip": cfg.grad_clip, "optimizer": "AdamW",
                     "target_steps": cfg.steps, "argv": argv or []},
        "steps": steps,
        "images_seen": steps * cfg.batch_size * world,
        "wall_time_s": round(wall, 2),
        "loss": loss_summary(losses),
    }
    if lineage:
        meta["init"] = lineage
        parents = totals(lineage)
        meta["images_seen_total"] = meta["images_seen"] + parents["images_seen"]
        meta["wall_time_s_total"] = round(wall + parents["wall_time_s"], 2)
    if data_offset:
        meta["data_step_offset"] = data_offset
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    state.update(_optimizer_tensors(opt, params))
    state["loss_history"] = torch.tensor(losses, dtype=torch.float32)
    ckpt.save_tensors(state_path(output), state, dict(meta, format="d3ip-train-state", identity=_jsonable(cfg.identity())))
    if final:
        ckpt.save_prior(output, ema, meta)
    return dict(meta, architecture=model.config.to_dict())


def slim_state(source: str | os.PathLike, target: str | os.PathLike, *, ema_only: bool = False) -> dict[str, Any]:
    """Copy a training state without the AdamW moments (half the size, for committing).

    A run resumed from a slim state continues from the same weights, EMA, step and loss
    history with fresh optimiser moments, so it is a warm start, not a bitwise continuation;
    the header says so (``"optimizer": "reset"``). ``ema_only`` also drops the live weights
    (a quarter of the size); a resumed run then restarts them from the EMA (``"model": "ema"``).
    """
    tensors, meta = ckpt.load_tensors(source)
    drop = ("optim.", "model.") if ema_only else ("optim.",)
    kept = {k: v for k, v in tensors.items() if not k.startswith(drop)}
    meta = dict(meta, optimizer="reset")
    if ema_only:
        meta["model"] = "ema"
    ckpt.save_tensors(target, kept, meta)
    return meta
