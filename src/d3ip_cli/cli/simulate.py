"""`d3ip simulate`: an image volume -> a measurement file (sinogram or k-space + operator spec)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

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
    OverwriteOpt,
    SeedOpt,
    SeriesOpt,
    SigmaOpt,
    SlicesOpt,
    ViewsOpt,
    emit_json,
    guarded,
    log,
    warn,
)


def register(app: typer.Typer) -> None:
    @app.command("simulate")
    @guarded
    def simulate(
        ctx: typer.Context,
        input: Annotated[Path, typer.Argument(help="Image volume: DICOM file/directory, NIfTI or .npy.")],
        output: Annotated[Path, typer.Option("-o", "--output", help="Measurement file to write (.h5).")],
        task: Annotated[str, typer.Option("--task", help="sparse-view, limited-angle or cs-mri.")],
        views: ViewsOpt = 60,
        arc: ArcOpt = 90.0,
        acceleration: AccelerationOpt = 4.0,
        mask: MaskOpt = "uniform1d",
        center_fraction: CenterFractionOpt = 0.08,
        coils: CoilsOpt = 1,
        backend: BackendOpt = "auto",
        noise: NoiseOpt = "none",
        i0: I0Opt = 1e5,
        sigma: SigmaOpt = 0.01,
        slices: SlicesOpt = None,
        grid: GridOpt = None,
        series: SeriesOpt = None,
        frame: FrameOpt = None,
        seed: SeedOpt = 0,
        device: DeviceOpt = "auto",
        overwrite: OverwriteOpt = False,
        json_out: JsonOpt = False,
    ) -> None:
        """Simulate an undersampled measurement from an image volume (a retrospective study).

        Writes the sinogram [Z, views, detectors] or k-space [Z, coils, ky, kx], the operator
        specification, intensity scale, image grid and provenance to one HDF5 file, plus the
        run record OUTPUT.json. Masks and noise are drawn from --seed.

        Example: d3ip simulate head.nii.gz -o head_sv30.h5 --task sparse-view --views 30 --noise poisson --i0 1e5
        """
        from d3ip_cli.core.config import SimulateConfig
        from d3ip_cli.core.device import resolve_device
        from d3ip_cli.core.record import RunRecord
        from d3ip_cli.engine.recon import prepare_volume, simulate_measurement, write_record
        from d3ip_cli.io.atomic import check_output, remove_outputs, sidecar_path
        from d3ip_cli.io.measurement import write_measurement

        cfg = SimulateConfig.from_options(task=task, views=views, arc=arc, acceleration=acceleration, mask=mask,
                                          center_fraction=center_fraction, coils=coils, backend=backend, noise=noise,
                                          i0=i0, sigma=sigma, slices=slices, grid=grid, series=series, frame=frame,
                                          seed=seed)
        check_acquisition_options(ctx, cfg.task, noise)
        from d3ip_cli.core.errors import UsageError
        from d3ip_cli.io.measurement import MEASUREMENT_SUFFIXES

        if not str(output).lower().endswith(MEASUREMENT_SUFFIXES):
            raise UsageError(f"-o {output}: a measurement is written as HDF5; give a name ending in .h5")
        dev = resolve_device(device)
        check_output(output, overwrite, inputs=(input,))
        check_output(sidecar_path(output), overwrite, inputs=(input,))
        record = RunRecord("simulate")
        record.add_input(input)
        with record.stage("load"):
            vol = prepare_volume(input, slices=cfg.slices, grid=cfg.grid, series=cfg.series, frame=cfg.frame)
        with record.stage("simulate"):
            meas, op, _ = simulate_measurement(vol, cfg, cfg, seed=cfg.seed, device=dev, source=str(Path(input).resolve()),
                                               argv=record["argv"])
        from d3ip_cli.engine.intensity import IntensityScale
        from d3ip_cli.engine.recon import acceleration_note, modality_note, scale_notes

        for note in scale_notes(vol, IntensityScale.from_dict(meas.intensity)):
            record.warn(note)
        if note := modality_note(vol, str(cfg.task)):
            record.warn(note)
        if note := acceleration_note(op, cfg.acceleration):
            record.warn(note)
        with record.stage("write"):
            path = write_measurement(meas, output, overwrite=overwrite)
        record["task"] = cfg.task
        record["seed"] = cfg.seed
        record["device"] = str(dev)
        record["config"] = cfg.model_dump()
        record["intensity"] = meas.intensity
        record["operator"] = {k: v for k, v in meas.spec.items() if k != "angles_deg"}
        record["measurement"] = {"kind": meas.kind, "shape": list(meas.data.shape),
                                 "noise": meas.provenance.get("noise")}
        for p in vol.meta.get("problems", []) or []:
            record.warn(str(p))
        record.add_output(path)
        try:
            write_record(record, path)
        except BaseException:  # no measurement without its run record
            remove_outputs(record)
            raise
        for w in record["warnings"]:  # on stderr with --json too
            warn(w)
        if json_out:
            emit_json(record.doc)
        else:
            log(f"wrote {path}: {meas.kind} {list(meas.data.shape)} ({op!r})")
