"""``d3ip info``: what a volume, measurement, prior or adapter file holds, and everything wrong with it.

The report (stdout, as a table or with ``--json`` one JSON object) gives the grid
``[Z, H, W]``, voxel spacing in mm along (Z, H, W), the RAS+ orientation codes of those
axes, the 4x4 affine (RAS+ mm, columns in array-axis order), modality, units, value
range, series description and UID, slice count and every problem found: missing slices,
uneven spacing, mixed series, assumed geometry. The input is read leniently, so a
broken series is still described; when it cannot be used as a regular volume the
command then fails with exit code 3 after printing the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Callable

import typer

from d3ip_cli.cli._common import emit_json, guarded
from d3ip_cli.cli.convert import FrameOpt, SeriesOpt

ReportJsonOpt = Annotated[bool, typer.Option("--json", help="Print the report as one JSON object on stdout.")]


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _table(doc: dict[str, Any]) -> str:
    """Human-readable two-column table of an info document."""
    rows: list[tuple[str, str]] = [("path", doc["path"]), ("format", doc["format"])]
    if "shape" in doc:
        z, h, w = doc["shape"]
        codes = doc["orientation"]
        rows += [
            ("modality", f"{doc['modality']} ({doc['units']})"
                         + (f"; the file says {doc['source_modality']}" if doc.get("source_modality") else "")),
            ("shape (Z, H, W)", f"{z} x {h} x {w}"),
            ("spacing mm (Z, H, W)", " x ".join(_fmt(s) for s in doc["spacing_mm"])),
            ("orientation", f"{codes} (slices -> {codes[0]}, rows -> {codes[1]}, columns -> {codes[2]}; RAS+)"),
        ]
        for i, row in enumerate(doc["affine"]):
            rows.append(("affine (RAS+ mm)" if i == 0 else "", "[" + " ".join(f"{v:10.4f}" for v in row) + " ]"))
        lo, hi = doc["value_range"]
        rows += [
            ("value range", f"{_fmt(lo)} .. {_fmt(hi)} (mean {_fmt(doc['mean'])}, std {_fmt(doc['std'])})"),
            ("series description", doc.get("series_description") or "-"),
            ("series UID", doc.get("series_uid") or "-"),
            ("slices", str(doc["slice_count"])),
        ]
        if "frames" in doc:
            rows.append(("frames (4D)", f"{doc['frames']} (shown: frame 0)"))
    if "weights" in doc:  # a prior, adapter or state file
        rows += [(k, v if isinstance(v, str) else str(v)) for k, v in doc["weights"].items()]
    if "kind" in doc:  # a measurement file
        axes = "Z, views, detectors" if doc["kind"] == "sinogram" else "Z, coils, ky, kx"
        rows += [("task", doc["task"]), (f"{doc['kind']} ({axes})", " x ".join(map(str, doc["data_shape"]))),
                 ("image grid (Z, H, W)", " x ".join(map(str, doc["image_shape"])))]
        rows += [("operator" if i == 0 else "", f"{k} = {v}") for i, (k, v) in enumerate(sorted(doc["operator"].items()))]
        if "frames" in doc:
            rows.append(("repetitions", f"{doc['frames']} (shown: repetition 0)"))
        rows += [("retrospective", "yes (simulated from an image volume)" if doc["retrospective"] else "no"),
                 ("noise", str(doc.get("noise") or "-")), ("source", str(doc.get("source") or "-"))]
    for i, s in enumerate(doc.get("series", [])):
        rows.append(("series" if i == 0 else "",
                     f"{s['series_uid']}  {s['modality']} '{s['series_description']}' ({s['files']} files)"))
    problems = doc.get("problems") or ["none"]
    for i, p in enumerate(problems):
        rows.append(("problems" if i == 0 else "", p))
    width = max(len(k) for k, _ in rows) + 2
    return "\n".join(f"{k:<{width}}{v}" for k, v in rows)


def register(app: typer.Typer) -> None:
    @app.command("info")
    @guarded
    def info(
        input: Annotated[Path, typer.Argument(
            metavar="INPUT", help="DICOM file or series directory, .nii/.nii.gz or .npy volume, a measurement "
                                  "file (.h5: d3ip, fastMRI or ISMRMRD), or a d3ip prior, adapter or training "
                                  "state (.safetensors).", show_default=False)],
        json_out: ReportJsonOpt = False,
        series: SeriesOpt = None,
        frame: FrameOpt = None,
    ) -> None:
        """Describe a volume (shape, spacing, orientation, affine, modality, values, series, problems),
        a measurement file (task, data shape, operator settings, image grid, provenance), or a d3ip
        prior, adapter or training state (network, resolution, training, what it was made for).

        Exits 3 (after the report) when the input cannot be used as one regular volume,
        for example a series with missing slices or a directory holding several series.

        Example:  d3ip info examples/mni_t1 --json
        """
        import warnings

        from d3ip_cli.core.errors import InputDataError
        from d3ip_cli.io.measurement import is_measurement_path
        from d3ip_cli.io.volumes import detect_format, read_volume, volume_summary

        doc: dict[str, Any] = {"path": str(input.resolve()) if input.exists() else str(input)}
        if input.name.endswith(".safetensors"):
            _emit(_weights_doc(input, doc), json_out)
            return
        if is_measurement_path(input):
            _emit(_measurement_doc(input, doc, frame), json_out)
            if not doc["ok"]:
                raise InputDataError(f"{input}: {doc['problems'][-1]}")
            return
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # third-party chatter; problems are in the report
                volume, frames = _first_frame(lambda f: read_volume(input, series=series, frame=f, strict=False), frame)
        except InputDataError as exc:
            listed = getattr(exc, "series", None)
            if listed is None:
                raise
            problem = f"mixed series: the directory holds {len(listed)} series; choose one with --series UID"
            doc.update({"format": "dicom", "series": listed, "problems": [problem], "ok": False})
            _emit(doc, json_out)
            raise InputDataError(f"{input} holds {len(listed)} series: choose one with --series UID") from None
        doc["format"] = detect_format(input)
        doc.update(volume_summary(volume))
        fatal = list(volume.meta.get("fatal_problems", []))
        doc["problems"] = list(volume.meta.get("problems", []))
        _note_frames(doc, frames, "frame", "4D with {n} frames")
        doc["ok"] = not fatal
        _emit(doc, json_out)
        if fatal:
            raise InputDataError(f"{input}: {fatal[0]}")


def _measurement_doc(path: Any, doc: dict[str, Any], frame: int | None) -> dict[str, Any]:
    """What a measurement file holds: task, data shape, operator settings, grid, provenance."""
    from d3ip_cli.io.measurement import read_measurement

    meas, frames = _first_frame(lambda f: read_measurement(path, frame=f), frame)
    spec = {k: v for k, v in meas.spec.items() if k != "angles_deg"}
    prov = meas.provenance or {}
    doc.update({"format": f"measurement ({meas.source_format})", "kind": meas.kind, "task": meas.task,
                "data_shape": list(meas.data.shape), "image_shape": list(meas.image_shape), "operator": spec,
                "retrospective": bool(prov.get("retrospective")), "noise": prov.get("noise"),
                "source": prov.get("source"), "intensity": meas.intensity or None, "problems": [], "ok": True})
    if meas.kind == "kspace" and meas.data.shape[1] > 1 and "coil_maps" not in meas.arrays:
        from d3ip_cli.physics.masks import calibration_width

        width = calibration_width(meas.arrays["mask"])
        if width < 8:
            doc["problems"].append(f"{meas.data.shape[1]}-coil k-space without coil maps and a fully sampled centre of "
                                   f"{width}x{width}: ESPIRiT needs at least 8x8, so it cannot be reconstructed")
            doc["ok"] = False
        else:
            doc["problems"].append(f"{meas.data.shape[1]}-coil k-space without coil maps: reconstruct estimates them "
                                   f"with ESPIRiT from the {min(width, 24)}x{min(width, 24)} centre")
    _note_frames(doc, frames, "repetition", "{n} repetitions")
    return doc


_WEIGHT_FORMATS = {"d3ip-prior": "diffusion prior (d3ip)", "d3ip-adapter": "LoRA adapter (d3ip)",
                   "d3ip-train-state": "training state of pretrain-phantom (d3ip)",
                   "d3ip-sampler-state": "reconstruction checkpoint of --checkpoint-dir (d3ip)"}


def _arch_text(a: dict[str, Any] | None) -> str:
    if not a:
        return "-"
    return (f"U-Net {a.get('model_channels')} channels x {tuple(a.get('channel_mult') or ())}, "
            f"{a.get('num_res_blocks')} res blocks a level, attention at {tuple(a.get('attention_levels') or ()) or 'none'}, "
            f"{a.get('in_channels', 1)} channel(s) in")


def _weights_doc(path: Path, doc: dict[str, Any]) -> dict[str, Any]:
    """What a d3ip safetensors file is (prior, adapter, training state, checkpoint) and its header's
    main facts; the file is checked as a prior load would check it (exit 3 when it is not one)."""
    from d3ip_cli.prior import checkpoint as ckpt
    from d3ip_cli.prior.pretrain import totals

    meta = ckpt.read_metadata(path, "safetensors file")
    fmt = meta.get("format")
    doc["format"] = _WEIGHT_FORMATS.get(fmt, f"safetensors with a d3ip header of format {fmt!r}")
    w: dict[str, Any] = {}
    if fmt == "d3ip-prior":
        tot = totals(meta)
        w["resolution"] = f"{meta.get('resolution')} x {meta.get('resolution')}"
        w["network"] = _arch_text(meta.get("architecture"))
        w["prediction"] = meta.get("prediction", "eps")
        w["trained"] = (f"{tot['steps']} steps, {tot['images_seen']} phantom images, {tot['wall_time_s'] / 3600:.1f} h "
                        f"in {tot['stages']} stage(s); last stage preset {meta.get('preset')}")
        w["real images in training"] = "yes" if (meta.get("data") or {}).get("real_images") else "no (synthetic phantoms only)"
        w["weights"] = meta.get("weights_dtype", "float32")
        w["sha256"] = ckpt.file_sha256(path)
    elif fmt == "d3ip-adapter":
        st = meta.get("settings") or {}
        w["made by"] = f"reconstruct --method {meta.get('method')} --task {meta.get('task')}"
        w["rank"] = meta.get("rank", st.get("lora_rank"))
        w["biases adapted"] = "yes" if meta.get("train_bias", st.get("train_bias")) else "no"
        w["for prior"] = f"sha256 {meta.get('prior_sha256') or '-'}"
        w["prior network"] = _arch_text(meta.get("architecture"))
    elif fmt == "d3ip-train-state":
        ident = meta.get("identity") or {}
        w["steps done"] = f"{meta.get('steps')} of {(meta.get('training') or {}).get('target_steps', '-')}"
        w["resolution"] = ident.get("resolution")
        w["network"] = _arch_text(ident.get("architecture"))
        w["continue with"] = "d3ip pretrain-phantom -o PRIOR.safetensors --resume (same settings)"
    else:
        w["header keys"] = ", ".join(sorted(meta))
    doc.update({"weights": w, "header": meta, "problems": [], "ok": True})
    return doc


def _first_frame(read: Callable[[int | None], Any], frame: int | None) -> tuple[Any, int | None]:
    """``read(frame)``, and ``None``; for a file of several frames given without ``--frame``
    (4D NIfTI/NumPy, ISMRMRD repetitions), its first frame and how many it holds."""
    from d3ip_cli.core.errors import FrameRequired

    try:
        return read(frame), None
    except FrameRequired as exc:
        return read(0), exc.frames


def _note_frames(doc: dict[str, Any], frames: int | None, unit: str, what: str) -> None:
    """Say in the report that it describes the first of ``frames`` and how other commands pick one."""
    if frames is not None:
        doc["frames"] = frames
        doc["problems"].insert(0, f"{what.format(n=frames)}: this report describes {unit} 0; other commands need "
                                  f"--frame N (0..{frames - 1})")


def _emit(doc: dict[str, Any], json_out: bool) -> None:
    if json_out:
        emit_json(doc)
    else:
        typer.echo(_table(doc))
