#!/usr/bin/env bash
# d3ip demo on the bundled real-anatomy example (examples/mni_t1, see NOTICE.md).
#
# For now: convert the bundled DICOM series to NIfTI under out/ (with its run record
# out/mni_t1.nii.gz.json) and describe the result as one JSON object on stdout.
# Run from anywhere: `bash examples/demo.sh` (or `make demo`).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -x .venv/bin/d3ip ]]; then
  D3IP=.venv/bin/d3ip
else
  D3IP=d3ip
fi

mkdir -p out
"$D3IP" convert examples/mni_t1 -o out/mni_t1.nii.gz --overwrite
"$D3IP" info --json out/mni_t1.nii.gz
