"""Derive the bundled real-anatomy example from the MNI152 2009a T1 template.

The example is a small axial MR volume, written twice with d3ip's own writers:

* ``examples/mni_t1/``       a DICOM series (MR Image Storage, one file per slice)
* ``examples/mni_t1.nii.gz`` the same grid and values as NIfTI

Source: ``mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz`` (ICBM 2009a nonlinear
symmetric T1 template, 197 x 233 x 189 at 1 mm, uint8), shipped in the nilearn wheel.
Get it without installing nilearn::

    pip download --no-deps nilearn -d /tmp/nl
    cd /tmp/nl && unzip -o nilearn-*.whl 'nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz'
    python examples/make_example.py /tmp/nl/nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz

Derivation
----------
The output grid is a conventional radiological axial stack: ``Z`` slices from inferior
to superior every ``--slice-spacing`` mm, each ``N x N`` pixels of ``--pixel`` mm with
rows running anterior -> posterior and columns right -> left (DICOM orientation
``[1, 0, 0, 0, 1, 0]``), centred on the brain. In RAS+ the grid affine is::

    x_RAS = c + z·(0, 0, Δz) + (h - (N-1)/2)·(0, -Δ, 0) + (w - (N-1)/2)·(-Δ, 0, 0)

The template is low-pass filtered before sampling (Gaussian, σ = 0.4 of the new voxel
size per axis, against aliasing), sampled at the grid points with trilinear
interpolation (``scipy.ndimage.map_coordinates``, outside the template = 0), scaled
×4 to a 0..1020 range and rounded to integers, like the 10-12-bit magnitude values of a
scanner. Integer values make both files lossless (int16) and small.

Everything is deterministic: same template file, same options -> identical voxel
values and DICOM UIDs. The template's copyright notice is in ``examples/NOTICE.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TEMPLATE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def resample_template(path: Path, slices: int, size: int, pixel: float, slice_spacing: float,
                      center_ras: tuple[float, float, float]):
    """Sample the template on the example grid; return ``(data [Z, N, N], affine)``."""
    import nibabel as nib
    from scipy import ndimage

    img = nib.load(str(path))
    src = np.asarray(img.dataobj, dtype=np.float64)
    A_src = img.affine
    vox = np.sqrt((A_src[:3, :3] ** 2).sum(axis=0))
    sigma = [0.4 * step / v for step, v in zip((pixel, pixel, slice_spacing), vox)]
    smooth = ndimage.gaussian_filter(src, sigma=sigma, mode="constant")

    c = np.asarray(center_ras, dtype=np.float64)
    half = (size - 1) / 2.0
    affine = np.eye(4)
    affine[:3, 0] = (0.0, 0.0, slice_spacing)
    affine[:3, 1] = (0.0, -pixel, 0.0)
    affine[:3, 2] = (-pixel, 0.0, 0.0)
    affine[:3, 3] = c - (slices - 1) / 2.0 * affine[:3, 0] - half * affine[:3, 1] - half * affine[:3, 2]

    z, h, w = np.meshgrid(np.arange(slices), np.arange(size), np.arange(size), indexing="ij")
    zhw1 = np.stack([z.ravel(), h.ravel(), w.ravel(), np.ones(z.size)])
    ijk = (np.linalg.inv(A_src) @ affine @ zhw1)[:3]
    values = ndimage.map_coordinates(smooth, ijk, order=1, mode="constant", cval=0.0)
    data = np.rint(values.reshape(slices, size, size) * 4.0).clip(0, None).astype(np.float32)
    return data, affine


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("template", type=Path, help=f"path to {TEMPLATE} (from the nilearn wheel)")
    ap.add_argument("--out", type=Path, default=HERE, help="output folder (default: examples/)")
    ap.add_argument("--slices", type=int, default=20)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--pixel", type=float, default=1.6, help="in-plane pixel size, mm")
    ap.add_argument("--slice-spacing", type=float, default=5.0, help="mm between slices")
    ap.add_argument("--center", type=float, nargs=3, default=(0.0, -18.0, 18.0), metavar=("R", "A", "S"),
                    help="grid centre in MNI RAS mm")
    args = ap.parse_args(argv)
    if not args.template.is_file():
        ap.error(f"{args.template} not found (see the module docstring for how to get it)")

    from d3ip_cli.core.types import Volume
    from d3ip_cli.io.volumes import write_volume

    data, affine = resample_template(args.template, args.slices, args.size, args.pixel, args.slice_spacing,
                                     tuple(args.center))
    sha = hashlib.sha256(args.template.read_bytes()).hexdigest()
    meta = {
        "modality": "MR",
        "units": "a.u.",
        "series_description": "MNI152 2009a T1 template (resampled)",
        "source_sha256": sha,
        "dicom": {
            "PatientName": "MNI152^ICBM2009a",
            "PatientID": "MNI152-2009a-sym",
            "StudyDescription": "d3ip example: MNI152 2009a T1 template",
            "StudyID": "1",
            "BodyPartExamined": "HEAD",
            "PatientPosition": "HFS",
            "MRAcquisitionType": "3D",
            "SeriesNumber": 1,
        },
    }
    volume = Volume(data, affine, meta)
    description = "MNI152 2009a T1 template, d3ip example"
    seed = f"d3ip-example|{sha}|{args.slices}|{args.size}|{args.pixel}|{args.slice_spacing}|{tuple(args.center)}"
    args.out.mkdir(parents=True, exist_ok=True)
    series = write_volume(volume, args.out / "mni_t1", format="dicom", overwrite=True,
                          description=description, uid_seed=seed)
    nifti = write_volume(volume, args.out / "mni_t1.nii.gz", overwrite=True, description="MNI152 2009a T1 example")
    size = sum(f.stat().st_size for f in series.iterdir()) + nifti.stat().st_size
    print(f"wrote {series}/ ({args.slices} files) and {nifti}: {data.shape}, values {data.min():g}..{data.max():g}, "
          f"{size / 1024:.0f} KiB in all", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
