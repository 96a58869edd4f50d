"""`d3ip metrics`: PSNR, SSIM and through-slice error of a reconstruction against a reference."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from d3ip_cli.cli._common import JsonOpt, emit_json, guarded, warn


def register(app: typer.Typer) -> None:
    @app.command("metrics")
    @guarded
    def metrics(
        recon: Annotated[Path, typer.Argument(help="Reconstructed volume (DICOM, NIfTI or .npy).")],
        reference: Annotated[Path, typer.Argument(help="Reference volume on the same grid.")],
        data_range: Annotated[Optional[float], typer.Option("--data-range", help="Data range L for PSNR/SSIM "
                                                            "(default: reference max - min).")] = None,
        slices: Annotated[Optional[str], typer.Option("--slices", help="Cut the reference to slab A:B first, as "
                                                      "reconstruct --slices cut its input.")] = None,
        grid: Annotated[Optional[int], typer.Option("--grid", help="Resample the reference in-plane to N x N, as "
                                                    "reconstruct --grid resampled its input.")] = None,
        json_out: JsonOpt = False,
    ) -> None:
        """Compare a reconstruction with a reference volume: PSNR, SSIM, NRMSE, through-slice error.

        PSNR is over the whole volume, SSIM the mean of axial-slice SSIMs (scikit-image), both
        with an explicit data range; z_rel_l2 is the relative L2 error of slice-to-slice differences.
        A CT reference padded below -1024 HU outside the field of view is clipped there (with a
        warning), as reconstruct clips its input.

        --slices and --grid cut and resample the reference the way reconstruct cut its input, so
        a run's own scores can be recomputed from the files.

        Example: d3ip metrics recon.nii.gz truth.nii.gz --json
        """
        from d3ip_cli.bench.metrics import volume_metrics
        from d3ip_cli.engine.intensity import clip_reference, scale_for_volume
        from d3ip_cli.io.volumes import check_same_grid, read_single_frame

        from d3ip_cli.core.config import ReconConfig
        from d3ip_cli.engine.recon import align_reference

        ReconConfig.from_options(slices=slices, grid=grid)  # checked as reconstruct checks them
        x = read_single_frame(recon, "RECON")
        # the same grid stored in another axis order or direction is compared voxel for voxel
        r = align_reference(read_single_frame(reference, "REFERENCE"), x, slices=slices, grid=grid)
        if x.shape == r.shape:
            check_same_grid(x, r)
        elif not (slices or grid):
            from d3ip_cli.core.errors import InputDataError

            raise InputDataError(f"reconstruction shape {list(x.shape)} differs from reference shape {list(r.shape)}: if "
                                 "the reconstruction was cut or resampled (reconstruct --slices/--grid), give metrics "
                                 "the same --slices A:B and --grid N")
        # the reference read as reconstruct reads its input (a CT in HU, or values that say so when
        # the reconstruction is CT, as a dcm2niix NIfTI's do), and clipped the same way
        modality = "CT" if x.modality == "CT" or x.meta.get("units") == "HU" else r.modality
        scale = scale_for_volume(r.data, r.modality, str(r.meta.get("units", "a.u.")), modality)
        notes: list[str] = []
        ref = clip_reference(r.data, scale, notes, what="reference")
        doc = volume_metrics(x.data, ref, data_range=data_range)
        doc = {"recon": str(recon), "reference": str(reference), **doc}
        if notes:
            doc["warnings"] = notes
        for note in notes:
            warn(note)
        if json_out:
            emit_json(doc)
            return
        for key in ("psnr", "ssim", "nrmse", "z_rel_l2", "data_range"):
            val = doc.get(key)
            if val is None and key == "psnr" and doc.get("identical"):
                val = "inf (the volumes are identical)"  # JSON keeps null with identical: true
            typer.echo(f"{key:10s} {'n/a' if val is None else val}")
