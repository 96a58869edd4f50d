#!/usr/bin/env bash
# d3ip demo on the bundled real-anatomy example (examples/mni_t1, see NOTICE.md).
#
# 1. convert the bundled DICOM series to NIfTI (with its run record);
# 2. a retrospective sparse-view CT study (30 views): reconstruct the volume with d3ip
#    (the bundled phantom prior, adapted to this scan at test time) and with total
#    variation for comparison; write NIfTI outputs, run records and report PNGs in out/.
# Run from anywhere: `bash examples/demo.sh` (or `make demo`). Set D3IP_DEMO_SLICES=A:B
# to reconstruct a slab only (default: all 20 slices).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -x .venv/bin/d3ip ]]; then
  D3IP=.venv/bin/d3ip
else
  D3IP=d3ip
fi
SLICES=()
if [[ -n "${D3IP_DEMO_SLICES:-}" ]]; then SLICES=(--slices "$D3IP_DEMO_SLICES"); fi

mkdir -p out
"$D3IP" convert examples/mni_t1 -o out/mni_t1.nii.gz --overwrite
"$D3IP" reconstruct examples/mni_t1 --task sparse-view --views 30 --method tv "${SLICES[@]}" \
  -o out/mni_t1_tv_sparse-view.nii.gz --report out/mni_t1_tv_sparse-view.png --overwrite
"$D3IP" reconstruct examples/mni_t1 --task sparse-view --views 30 --method d3ip --preset fast "${SLICES[@]}" \
  -o out/mni_t1_d3ip_sparse-view.nii.gz --report out/mni_t1_d3ip_sparse-view.png --overwrite
echo "outputs, run records (*.json) and reports (*.png) are in out/" >&2
