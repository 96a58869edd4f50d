"""``d3ip pretrain-phantom``: train the phantom diffusion prior."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from d3ip_cli.cli._common import (
    DeviceOpt,
    JsonOpt,
    OverwriteOpt,
    SeedOpt,
    ThreadsOpt,
    emit_json,
    err_console,
    guarded,
    log,
    set_threads,
)


def register(app: typer.Typer) -> None:
    @app.command("pretrain-phantom")
    @guarded
    def pretrain_phantom(
        output: Annotated[Path, typer.Option("-o", "--output", help="Prior file to write (.safetensors).")],
        preset: Annotated[str, typer.Option("--preset", help="tiny (seconds), cpu (the default prior's recipe), paper (GPU).")] = "cpu",
        resolution: Annotated[Optional[int], typer.Option("--resolution", help="Phantom size in pixels.")] = None,
        steps: Annotated[Optional[int], typer.Option("--steps", help="Total optimisation steps (a resumed run continues up to it).")] = None,
        batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Images per step and process.")] = None,
        crop: Annotated[Optional[int], typer.Option("--crop", help="Train on random CROP-pixel windows (0: whole images).")] = None,
        sample_every: Annotated[Optional[int], typer.Option("--sample-every", help="Write a sample grid PNG every N steps (0: at the end only).")] = None,
        checkpoint_every: Annotated[Optional[int], typer.Option("--checkpoint-every", help="Checkpoint every N steps.")] = None,
        threads: ThreadsOpt = None,
        resume: Annotated[bool, typer.Option("--resume", help="Continue exactly from OUTPUT's training state.")] = False,
        init: Annotated[Optional[Path], typer.Option("--init", help="Start from this prior's weights (same architecture; the head may differ, e.g. a v head from an ε prior), e.g. whole images after crops.")] = None,
        lr: Annotated[Optional[float], typer.Option("--lr", help="AdamW learning rate (default: the preset's).")] = None,
        warmup: Annotated[Optional[int], typer.Option("--warmup", help="Linear learning-rate warm-up steps (default: the preset's).")] = None,
        anneal: Annotated[Optional[int], typer.Option("--anneal", help="Cosine-decay the learning rate to 0 over the last N of --steps (default: the preset's, 0 = constant), e.g. a final stage started with --init.")] = None,
        precision: Annotated[Optional[str], typer.Option("--precision", help="fp32, bf16 (autocast forward pass; ~3x faster on CPUs with AVX512-BF16) or auto (bf16 where supported). Default: the preset's.")] = None,
        prediction: Annotated[Optional[str], typer.Option("--prediction", help="The network's head: eps or v (it answers with ε either way). Default: the preset's.")] = None,
        seed: SeedOpt = 0,
        device: DeviceOpt = "auto",
        overwrite: OverwriteOpt = False,
        json_out: JsonOpt = False,
    ) -> None:
        """Train the diffusion prior on synthetic phantoms only (random ellipses and 3D ellipsoid slices).

        Writes OUTPUT (EMA weights + JSON header), OUTPUT's training state for --resume,
        a sample grid PNG, a loss curve PNG and a training record JSON beside it.

        Example:  d3ip pretrain-phantom -o prior.safetensors --preset tiny
        """
        import time

        import torch

        from d3ip_cli.core.device import resolve_device
        from d3ip_cli.core.errors import OutputError, UsageError
        from d3ip_cli.core.record import RunRecord
        from d3ip_cli.io.atomic import check_output, sidecar_path, write_json
        from d3ip_cli.prior import pretrain as pt

        if not str(output).endswith(".safetensors"):
            raise UsageError(f"-o {output}: the prior file must end in .safetensors")
        if steps is not None and steps < 1:
            raise UsageError(f"--steps must be positive, got {steps}")
        set_threads(threads)
        cfg = pt.PretrainConfig.from_preset(
            preset, resolution=resolution, steps=steps, batch_size=batch_size, seed=seed,
            crop=(None if crop == 0 else crop) if crop is not None else pt.PRESETS.get(preset, {}).get("crop"),
            sample_every=sample_every, checkpoint_every=checkpoint_every, lr=lr, warmup=warmup, anneal=anneal, precision=precision,
        )
        if prediction is not None:
            from d3ip_cli.prior.network import PREDICTIONS

            if prediction not in PREDICTIONS:
                raise UsageError(f"--prediction {prediction!r}: expected one of {', '.join(PREDICTIONS)}")
            cfg.architecture = dict(cfg.architecture, prediction=prediction)
        if lr is not None and not lr > 0:
            raise UsageError(f"--lr must be positive, got {lr}")
        if warmup is not None and warmup < 0:
            raise UsageError(f"--warmup must be non-negative, got {warmup}")
        if resume:
            if not pt.state_path(output).exists():
                raise UsageError(f"--resume: no training state {pt.state_path(output)} to continue")
            check_output(output, overwrite=True)
        else:
            check_output(output, overwrite=overwrite)
            if pt.state_path(output).exists() and not overwrite:
                raise OutputError(f"training state {pt.state_path(output)} exists (use --resume or --overwrite)")

        if init is not None:
            pt.check_init(init, cfg)  # a bad --init file fails now, before the progress bar
        dev = resolve_device(device)
        cfg.precision = pt.resolve_precision(cfg.precision, dev)
        distributed = pt.init_distributed(dev)
        if distributed and dev.type == "cuda":
            import os

            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(dev)
        rank = torch.distributed.get_rank() if distributed else 0
        record = RunRecord("pretrain-phantom")
        record["method"] = "pretrain-phantom"
        record["seed"] = seed
        record["device"] = str(dev)
        record["threads"] = torch.get_num_threads()  # throughput depends on it
        record["config"] = {"preset": cfg.preset, **cfg.identity(), "steps": cfg.steps}
        stem = output.name[: -len(".safetensors")]
        samples_png = output.parent / f"{stem}.samples.png"
        loss_png = output.parent / f"{stem}.loss.png"
        if not resume and rank == 0:  # a fresh run (--overwrite): no file of the previous run may outlive it
            keep = {Path(init).resolve()} if init is not None else set()
            for old in (output, sidecar_path(output), samples_png, loss_png, pt.state_path(output)):
                if old.is_file() and old.resolve() not in keep:
                    old.unlink()

        def on_checkpoint(step: int, ema, meta: dict) -> None:
            _sample_grid(ema, cfg.resolution, samples_png, step, seed)
            _loss_curve(output, loss_png, cfg.preset)  # also kept current when a run is stopped early

        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        with Progress(TextColumn("[bold]pretrain[/bold]"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[ips]:.1f} img/s"),
                      TimeElapsedColumn(), TimeRemainingColumn(), console=err_console,
                      disable=rank != 0) as bar:
            task = bar.add_task("train", total=cfg.steps, loss=float("nan"), ips=0.0)
            ema_ips = [0.0]

            plain = rank == 0 and not err_console.is_terminal

            def progress(info: dict) -> None:
                ema_ips[0] = info["images_per_s"] if ema_ips[0] == 0 else 0.95 * ema_ips[0] + 0.05 * info["images_per_s"]
                bar.update(task, completed=info["step"], loss=info["loss"], ips=ema_ips[0])
                if plain and (info["step"] % 50 == 0 or info["step"] == info["steps"]):
                    log(f"step {info['step']}/{info['steps']}  loss {info['loss']:.4f}  {ema_ips[0]:.1f} img/s  "
                        f"{time.perf_counter() - t0:.0f} s")

            t0 = time.perf_counter()
            try:
                meta = pt.train(cfg, output, resume=resume, device=dev, progress=progress, on_checkpoint=on_checkpoint,
                                argv=list(__import__("sys").argv), init=init)
            except KeyboardInterrupt:
                from d3ip_cli.core.errors import Interrupted

                state = pt.state_path(output)
                raise Interrupted(f"interrupted; the training state of the last checkpoint is in {state} (continue "
                                  "with --resume)" if state.exists() else "interrupted before the first checkpoint") from None
        if rank != 0:
            return
        from d3ip_cli.prior import checkpoint as ckpt

        _loss_curve(output, loss_png, cfg.preset)
        record["prior"] = str(output.resolve())
        record["prior_sha256"] = ckpt.file_sha256(output)
        record["training"] = {k: meta.get(k) for k in ("steps", "images_seen", "wall_time_s", "loss",
                                                       "images_seen_total", "init") if k in meta}
        record["training"]["this_run_s"] = round(time.perf_counter() - t0, 2)
        record.add_output(output)
        for extra in (samples_png, loss_png):
            if extra.exists():
                record.add_output(extra, role="figure")
        doc = record.finish()
        doc["output"] = str(output.resolve())
        write_json(sidecar_path(output), doc)
        if json_out:
            emit_json(doc)
        else:
            log(f"wrote {output} ({meta.get('steps')} steps, {meta.get('images_seen')} images seen)")


def _loss_curve(output: Path, png: Path, preset: str) -> None:
    """The loss history of the training state beside ``output``, as a PNG (log scale, smoothed)."""
    from d3ip_cli.io.figures import save_curve
    from d3ip_cli.prior import checkpoint as ckpt
    from d3ip_cli.prior import pretrain as pt

    tensors, meta = ckpt.load_tensors(pt.state_path(output))
    head = ((meta.get("identity") or {}).get("architecture") or {}).get("prediction", "eps")
    losses = tensors["loss_history"].numpy()
    if len(losses):
        save_curve(range(1, len(losses) + 1), losses, png, xlabel="step", ylabel=f"{head.replace('eps', 'ε')}-MSE loss",
                   logy=True,
                   smooth=min(200, max(1, len(losses) // 10)), title=f"pretrain-phantom ({preset})")


def _sample_grid(model, resolution: int, path: Path, step: int, seed: int, n: int = 16, steps: int = 50) -> None:
    """Unconditional DDIM samples of the EMA model, as a PNG grid."""
    import torch

    from d3ip_cli.engine.samplers import prior_samples
    from d3ip_cli.io.figures import save_image_grid

    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed + 12345)
    imgs = prior_samples(model, n, resolution, steps=steps, batch=n, generator=g).cpu().numpy()
    save_image_grid(imgs, path, title=f"unconditional DDIM samples ({steps} steps) after {step} training steps")
