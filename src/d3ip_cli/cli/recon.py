"""`d3ip reconstruct`: options -> ReconConfig -> engine.recon -> write + run record."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from d3ip_cli.cli._common import (
    AccelerationOpt,
    ArcOpt,
    BackendOpt,
    CenterFractionOpt,
    CoilsOpt,
    check_acquisition_options,
    DeviceOpt,
    FrameOpt,
    GridOpt,
    I0Opt,
    JsonOpt,
    MaskOpt,
    NoiseOpt,
    OutputOpt,
    OverwriteOpt,
    SeedOpt,
    SeriesOpt,
    SigmaOpt,
    SlicesOpt,
    STATE,
    ThreadsOpt,
    TaskOpt,
    ViewsOpt,
    emit_json,
    guarded,
    log,
    warn,
    progress_bar,
    set_threads,
)


ACQUISITION_OPTIONS = ("views", "arc", "acceleration", "mask", "center_fraction", "coils", "noise", "i0", "sigma",
                       "series")
"""Options that describe how to simulate from an image volume; a measurement file overrides them."""


def register(app: typer.Typer) -> None:
    @app.command("reconstruct")
    @guarded
    def reconstruct(
        ctx: typer.Context,
        input: Annotated[Path, typer.Argument(help="Image volume (+ --task: retrospective study) or measurement "
                                                   "file (.h5: d3ip, fastMRI or ISMRMRD).")],
        output: OutputOpt = None,
        task: TaskOpt = None,
        views: ViewsOpt = 60,
        arc: ArcOpt = 90.0,
        acceleration: AccelerationOpt = 4.0,
        mask: MaskOpt = "uniform1d",
        center_fraction: CenterFractionOpt = 0.08,
        coils: CoilsOpt = 1,
        backend: BackendOpt = "auto",
        slices: SlicesOpt = None,
        grid: GridOpt = None,
        noise: NoiseOpt = "none",
        i0: I0Opt = 1e5,
        sigma: SigmaOpt = 0.01,
        method: Annotated[str, typer.Option("--method", help="d3ip (default), dds, ddip, d3ip-mbir, d3ip-meta, "
                                                             "or classical: fbp, cgls, tv, zero-filled, l1-wavelet.")] = "d3ip",
        prior: Annotated[Optional[str], typer.Option("--prior", help="Prior weights (.safetensors).")] = None,
        preset: Annotated[Optional[str], typer.Option("--preset", help="fast (the default: 20 steps, for a CPU), standard (the paper's settings) or paper (standard with the reference's bias training, for a GPU).")] = None,
        reference: Annotated[Optional[Path], typer.Option("--reference", help="Reference volume for metrics.")] = None,
        report: Annotated[Optional[Path], typer.Option("--report", help="Write a PNG of axial/coronal/sagittal views: initial estimate, reconstruction, reference and error (with a reference), and the posterior std (--samples > 1).")] = None,
        json_out: JsonOpt = False,
        seed: SeedOpt = 0,
        device: DeviceOpt = "auto",
        threads: ThreadsOpt = None,
        overwrite: OverwriteOpt = False,
        checkpoint_dir: Annotated[Optional[str], typer.Option("--checkpoint-dir", help="Save the sampler state here every --checkpoint-every steps; SIGTERM/SIGINT save it and exit 130.")] = None,
        resume: Annotated[bool, typer.Option("--resume", help="Continue from --checkpoint-dir (a checkpoint of another input or configuration is refused, exit 3).")] = False,
        samples: Annotated[int, typer.Option("--samples", help="Posterior samples K (diffusion methods), drawn together under one adaptation: writes their mean, and their standard deviation as OUTPUT_std beside it. 4 is worth it on noisy data.")] = 1,
        format: Annotated[Optional[str], typer.Option("--format", help="Output format: nifti, npy or dicom.")] = None,
        series: SeriesOpt = None,
        frame: FrameOpt = None,
        weight: Annotated[Optional[float], typer.Option("--weight", help="Regularisation weight (tv, l1-wavelet; tv: in-plane).")] = None,
        weight_z: Annotated[Optional[float], typer.Option("--weight-z", help="tv: through-slice weight (default: --weight's; 0 = slice by slice).")] = None,
        fbp_filter: Annotated[Optional[str], typer.Option("--filter", help="fbp: ram-lak (default), shepp-logan, cosine, hamming or hann.")] = None,
        steps: Annotated[Optional[int], typer.Option("--steps", help="Diffusion: DDIM steps T (preset: fast 20, standard 50).", rich_help_panel="Diffusion engine")] = None,
        t_start: Annotated[Optional[int], typer.Option("--t-start", help="Diffusion: spread the steps over [0, T0) of the 1000 training steps, starting from the initial estimate diffused to the first (preset: fast 60 for CT, 250 for MRI; standard 1000 = from noise).", rich_help_panel="Diffusion engine")] = None,
        eta: Annotated[Optional[float], typer.Option("--eta", help="Diffusion: DDIM stochasticity η (default 0.85; 0 = ODE).", rich_help_panel="Diffusion engine")] = None,
        adapt_iters: Annotated[Optional[int], typer.Option("--adapt-iters", help="Adaptation: AdamW steps per sampling step (preset: fast 15 for sparse-view, 10 for limited-angle, 6 for MRI; standard 10).", rich_help_panel="Diffusion engine")] = None,
        adapt_batch: Annotated[Optional[int], typer.Option("--adapt-batch", help="Adaptation: slices per minibatch (preset: fast 2, standard 3; d3ip-mbir takes a contiguous block).", rich_help_panel="Diffusion engine")] = None,
        lr: Annotated[Optional[float], typer.Option("--lr", help="Adaptation: AdamW learning rate (preset: fast 3e-3, standard 1e-3).", rich_help_panel="Diffusion engine")] = None,
        lora_rank: Annotated[Optional[int], typer.Option("--lora-rank", help="Adaptation: LoRA rank (preset: fast 16 for sparse-view and MRI, 4 for limited-angle; standard 4; --adapter: the adapter's).", rich_help_panel="Diffusion engine")] = None,
        train_bias: Annotated[Optional[bool], typer.Option("--train-bias/--no-train-bias", help="Adaptation: also train block biases.", rich_help_panel="Diffusion engine")] = None,
        cg_iter: Annotated[Optional[int], typer.Option("--cg-iter", help="Data consistency: CG iterations with --fit steps, or where the data do not record their noise (default 5).", rich_help_panel="Diffusion engine")] = None,
        fit: Annotated[Optional[str], typer.Option("--fit", help="Data consistency: steps (a fixed --cg-iter CG steps) or noise (CG from the prior's estimate down to the data's noise level, at most 50 steps, where the data record it; see --tau; preset: fast noise, standard/paper steps).", rich_help_panel="Diffusion engine")] = None,
        tau: Annotated[Optional[float], typer.Option("--tau", help="--fit noise: leave tau² of the fittable noise energy in the residual (default 0.7; 1 = the discrepancy principle).", rich_help_panel="Diffusion engine")] = None,
        gamma: Annotated[Optional[float], typer.Option("--gamma", help="Data consistency: proximal weight γ (MRI).", rich_help_panel="Diffusion engine")] = None,
        lam: Annotated[Optional[float], typer.Option("--lam", help="d3ip-mbir: weight λ of total variation along z in its ADMM data consistency (default 0.03 for CT, 0.003 for MRI).", rich_help_panel="Diffusion engine")] = None,
        mbir_start: Annotated[Optional[str], typer.Option("--mbir-start", help="d3ip-mbir: start its ADMM step from x0 (the prior's estimate x̂0, as DiffusionMBIR) or fit (x̂0 first fitted down to the data's noise; needs --fit noise and data that record their noise; preset: fast fit for limited-angle, x0 otherwise).", rich_help_panel="Diffusion engine")] = None,
        precision: Annotated[Optional[str], typer.Option("--precision", help="Diffusion: network arithmetic, fp32, bf16 or auto (bf16 where the device computes it natively; preset: fast auto, standard/paper fp32).", rich_help_panel="Diffusion engine")] = None,
        checkpoint_every: Annotated[Optional[int], typer.Option("--checkpoint-every", help="Checkpoint every N sampling steps (default 5).", rich_help_panel="Diffusion engine")] = None,
        adapter: Annotated[Optional[str], typer.Option("--adapter", help="Start from a saved adapter (.safetensors).", rich_help_panel="Diffusion engine")] = None,
        save_adapter: Annotated[Optional[str], typer.Option("--save-adapter", help="Save the adapted LoRA parameters (.safetensors).", rich_help_panel="Diffusion engine")] = None,
        debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of failures.")] = False,
    ) -> None:
        """Reconstruct a 3D volume from undersampled CT or MRI data.

        An image volume plus --task is a retrospective study: the measurement is simulated,
        reconstructed, and PSNR/SSIM are reported against the input. A measurement file
        (from d3ip simulate, fastMRI-style HDF5 or ISMRMRD) is reconstructed as is. The output
        goes beside the input unless -o is given, with the run record OUTPUT.json.

        Diffusion methods size their slice batches from free memory and refuse, before any work, a
        volume that cannot fit (exit 5, naming how many slices would); D3IP_MEMORY_LIMIT_GB=N limits
        the memory they plan for. Under torchrun (torchrun --nproc-per-node K -m d3ip_cli reconstruct
        ...) slices are sharded across ranks and rank 0 writes; see examples/slurm/.

        Example: d3ip reconstruct head.nii.gz --task sparse-view --views 30 --method tv -o head_tv.nii.gz --json
        """
        if debug:
            STATE["debug"] = True
        from d3ip_cli.core.config import ReconConfig
        from d3ip_cli.core.device import resolve_device
        from d3ip_cli.core.record import RunRecord
        from d3ip_cli.engine import recon as engine
        from d3ip_cli.engine.methods import get_method
        from d3ip_cli.io.atomic import check_distinct_outputs, check_output, remove_outputs, sidecar_path
        from d3ip_cli.io.measurement import is_measurement_path, peek_task

        cfg = ReconConfig.from_options(
            task=task, views=views, arc=arc, acceleration=acceleration, mask=mask, center_fraction=center_fraction,
            coils=coils, backend=backend, slices=slices, grid=grid, noise=noise, i0=i0, sigma=sigma, method=method,
            prior=prior, preset=preset, seed=seed, samples=samples, weight=weight, weight_z=weight_z, filter=fbp_filter, format=format, series=series,
            frame=frame, checkpoint_dir=checkpoint_dir, resume=resume, steps=steps, t_start=t_start, eta=eta, adapt_iters=adapt_iters,
            adapt_batch=adapt_batch, lr=lr, lora_rank=lora_rank, train_bias=train_bias, cg_iter=cg_iter, fit=fit, tau=tau, gamma=gamma, lam=lam, mbir_start=mbir_start,
            checkpoint_every=checkpoint_every, adapter=adapter, save_adapter=save_adapter, precision=precision)
        from d3ip_cli.engine import distributed

        set_threads(threads)
        dev = resolve_device(device)
        if distributed.init_from_env(dev):
            dev = distributed.local_device(dev)
        rank, world_size = distributed.world()
        task_name = cfg.task or (peek_task(input) if is_measurement_path(input) else None)
        if cfg.task and not is_measurement_path(input):
            check_acquisition_options(ctx, cfg.task, noise)
        if is_measurement_path(input):  # the file fixes the acquisition: refuse options that would change it
            given = [f"--{n.replace('_', '-')}" for n in ACQUISITION_OPTIONS
                     if getattr(ctx.get_parameter_source(n), "name", None) == "COMMANDLINE"]
            from d3ip_cli.core.errors import UsageError

            if "--series" in given:
                raise UsageError(f"--series picks one series of a DICOM folder; {input.name} is a measurement file")
            if given:
                raise UsageError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to {input.name}: a "
                                 "measurement file fixes the acquisition (--slices and --grid do apply)")
            if task_name == "cs-mri" and getattr(ctx.get_parameter_source("backend"), "name", None) == "COMMANDLINE":
                raise UsageError(f"--backend picks the CT projector; {input.name} holds MRI (cs-mri) data")
        if get_method(cfg.method, task_name).classical and resume:
            from d3ip_cli.core.errors import UsageError

            raise UsageError(f"--resume continues an interrupted diffusion run; {cfg.method} runs in one go, with "
                             "nothing to resume")
        if checkpoint_every is not None and not checkpoint_dir:
            from d3ip_cli.core.errors import UsageError

            raise UsageError("--checkpoint-every sets how often --checkpoint-dir DIR is written: give --checkpoint-dir too")
        if resume and not checkpoint_dir:
            from d3ip_cli.core.errors import UsageError

            raise UsageError("--resume continues from --checkpoint-dir DIR: give the folder of the interrupted run")
        if output is None:
            if not input.exists():
                from d3ip_cli.core.errors import InputDataError

                raise InputDataError(f"{input} does not exist")
            out_path, out_format = engine.default_output_path(input, cfg.method, task_name or "recon", cfg.format)
        else:
            out_path, out_format = output, cfg.format
        from d3ip_cli.core.errors import UsageError
        from d3ip_cli.io.volumes import output_format

        series_out = output_format(out_path, out_format) == "dicom"  # a bad --format or name fails now
        if report is not None and not str(report).lower().endswith(".png"):
            raise UsageError(f"--report {report}: the report is a PNG image; give a name ending in .png")
        check_distinct_outputs({"-o": out_path, "the run record": sidecar_path(out_path),
                                "the standard-deviation map": engine.std_output_path(out_path) if cfg.samples > 1 else None,
                                "--report": report, "--save-adapter": cfg.save_adapter,
                                "--checkpoint-dir": cfg.checkpoint_dir})
        inputs = (input,) + ((reference,) if reference is not None else ()) + ((cfg.adapter,) if cfg.adapter else ())
        check_output(out_path, overwrite, inputs, series=series_out)
        check_output(sidecar_path(out_path), overwrite, inputs)  # the run record beside it
        if cfg.samples > 1:  # the posterior standard-deviation map goes beside the output
            check_output(engine.std_output_path(out_path), overwrite, inputs, series=series_out)
        if report is not None:
            check_output(report, overwrite, inputs)
        from d3ip_cli.engine.diffusion import DIFFUSION_METHODS, check_adapter_options, check_grid_for_prior

        check_adapter_options(cfg.method, cfg.adapter, cfg.save_adapter)
        if cfg.method in DIFFUSION_METHODS:
            check_grid_for_prior(cfg.prior, cfg.grid)
        if cfg.save_adapter:
            if not str(cfg.save_adapter).endswith(".safetensors"):
                raise UsageError(f"--save-adapter {cfg.save_adapter}: the adapter file must end in .safetensors")
            check_output(cfg.save_adapter, overwrite, inputs)

        # each warning is said when it is recorded: those known before a long run, before it
        record = RunRecord("reconstruct", on_warning=warn if rank == 0 else None)
        record.add_input(input)
        if reference is not None:
            record.add_input(reference, role="reference")
        if cfg.adapter:
            record.add_input(cfg.adapter, role="adapter")
        with progress_bar(cfg.method, disable=rank != 0) as cb:
            result = engine.reconstruct(input, cfg, device=dev, record=record, progress=cb, reference_path=reference)
        if rank != 0:  # rank 0 gathered the slices and writes
            distributed.barrier()
            return
        record["world_size"] = world_size
        uid_seed = "|".join(str(e.get("sha256", "")) for e in record["inputs"]) + "|" + cfg.model_dump_json()
        try:  # all or nothing: a failure here removes what this run wrote (the adapter included)
            with record.stage("write"):
                path = engine.write_result(result, out_path, overwrite=overwrite, format=out_format, record=record,
                                           report=report, uid_seed=uid_seed)
            engine.write_record(record, path)
        except BaseException:
            remove_outputs(record)
            raise
        if world_size > 1:
            distributed.barrier()
        if json_out:
            emit_json(record.doc)
            return
        m = result.metrics
        summary = f"wrote {path} ({record['method']}, {record['task']}, {record['wall_time_s']:.1f} s)"
        if m and m.get("psnr") is not None:
            summary += f"  PSNR {m['psnr']:.2f} dB  SSIM {m['ssim']:.4f}" if m.get("ssim") is not None else ""
        log(summary)
