"""``d3ip convert``: any supported volume format to any other, with the run record.

The command reads through :func:`d3ip_cli.io.volumes.read_volume` and writes through
:func:`d3ip_cli.io.volumes.write_volume`, the same code the engine uses, so a
conversion shows exactly what a reconstruction would read and write. The output
format follows the suffix of ``-o`` (``.nii``/``.nii.gz``: NIfTI, ``.npy``: NumPy,
no suffix: a DICOM series directory) unless ``--format`` says otherwise. Beside the
output, ``OUTPUT.json`` holds the run record (DESIGN §7), including the grid and
affine under ``"volume"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from d3ip_cli.cli._common import JsonOpt, OverwriteOpt, emit_json, guarded, log, warn

SeriesOpt = Annotated[Optional[str], typer.Option(
    "--series", help="SeriesInstanceUID (or a unique prefix) to read when a DICOM directory holds several series.")]
FrameOpt = Annotated[Optional[int], typer.Option("--frame", help="Volume index to read from a 4D NIfTI/NumPy input.")]
InputArg = Annotated[Path, typer.Argument(
    metavar="INPUT", help="DICOM file or series directory, .nii/.nii.gz or .npy volume.", show_default=False)]


def register(app: typer.Typer) -> None:
    @app.command("convert")
    @guarded
    def convert(
        input: InputArg,
        output: Annotated[Path, typer.Option(
            "-o", "--output", help="Output: .nii/.nii.gz, .npy, or a directory for a DICOM series.",
            show_default=False)],
        format: Annotated[Optional[str], typer.Option(
            "--format", help="dicom, nifti or npy (default: from the output suffix).")] = None,
        series: SeriesOpt = None,
        frame: FrameOpt = None,
        overwrite: OverwriteOpt = False,
        json_out: JsonOpt = False,
    ) -> None:
        """Convert a volume between DICOM, NIfTI and NumPy, keeping geometry and values.

        A DICOM series written by d3ip is a derived series (new series and instance UIDs,
        patient/study/frame of reference kept) of classic CT or MR images. The run record
        is written to OUTPUT.json.

        Example:  d3ip convert examples/mni_t1 -o out/mni_t1.nii.gz
        """
        import warnings

        from d3ip_cli.core.record import RunRecord
        from d3ip_cli.io.atomic import _remove, check_output, sidecar_path, write_json
        from d3ip_cli.io.numpy_io import geometry_doc
        from d3ip_cli.io.volumes import D3ipWarning, output_format, read_volume, volume_summary, write_volume

        fmt = output_format(output, format)
        check_output(output, overwrite, inputs=(input,), series=fmt == "dicom")
        check_output(sidecar_path(output), overwrite, inputs=(input,))
        record = RunRecord("convert")
        record["method"] = "convert"
        record["config"] = {"format": fmt, "series": series, "frame": frame, "overwrite": overwrite}
        description = "d3ip convert"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", D3ipWarning)
            with record.stage("read"):
                volume = read_volume(input, series=series, frame=frame)
            record.add_input(input)
            input_hash = record["inputs"][0].get("sha256", str(input))
            uid_seed = f"convert|{input_hash}|{series}|{frame}"
            with record.stage("write"):
                write_volume(volume, output, format=fmt, overwrite=overwrite, description=description,
                             uid_seed=uid_seed)
        try:  # the output stands only with its run record: an interrupt while hashing or writing it removes both
            notes = list(volume.meta.get("problems", [])) + [str(w.message) for w in caught
                                                             if issubclass(w.category, D3ipWarning)]
            for note in notes:
                warn(note)
                record.warn(note)
            doc_volume = geometry_doc(volume, description)
            doc_volume.update({k: v for k, v in volume_summary(volume).items() if k in ("value_range", "mean", "std")})
            record["volume"] = doc_volume
            record.add_output(output)
            doc = record.finish()
            write_json(sidecar_path(output), doc, overwrite=True)
        except BaseException:
            _remove(output)
            _remove(sidecar_path(output))  # a .npy output's geometry sidecar
            raise
        if json_out:
            emit_json(doc)
        else:
            z, h, w = volume.shape
            log(f"wrote {output} ({fmt}, {z}x{h}x{w}, {volume.modality}) and {sidecar_path(output).name}")
