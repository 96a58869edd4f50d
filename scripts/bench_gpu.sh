#!/usr/bin/env bash
# The GPU measurements of docs/gpu/README.md, on one CUDA device:
#   bash scripts/bench_gpu.sh OUTDIR [PRIOR]
# 1. pretrain-phantom throughput of the bundled architecture (`--preset cpu`, batch 128, bf16);
# 2. `reconstruct --preset fast` on 8 slices of 128x128 and `--preset paper` on all 20, wall time
#    and peak memory of the whole process (start-up and prior loading included);
# 3. the claims suite at the fast preset (PRIOR, default the bundled one) and at the paper preset.
# Session 7 ran these steps on an H100 through the workplace's device tool (docs/gpu/).
set -euo pipefail
out=${1:?usage: bash scripts/bench_gpu.sh OUTDIR [PRIOR]}
prior=${2:-}
mkdir -p "$out"
d3ip=${D3IP:-d3ip}
[ -x /usr/bin/time ] || { echo "bench_gpu.sh: needs GNU time at /usr/bin/time" >&2; exit 2; }
T() { /usr/bin/time -f "%e s wall, %M KB peak RSS" "$@"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
# GPU utilisation and memory in use, every 5 s, for the whole script
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 5 > "$out/gpu_usage.csv" &
smi=$!
trap 'kill $smi 2>/dev/null' EXIT

T $d3ip pretrain-phantom -o "$out/probe/p.safetensors" --preset cpu --steps 300 --batch-size 128 \
    --checkpoint-every 1000 --sample-every 0 --device cuda --overwrite 2>&1 | tee "$out/pretrain_probe.txt" | tail -3

T $d3ip reconstruct examples/mni_t1.nii.gz --task sparse-view --slices 6:14 --grid 128 --preset fast \
    --device cuda -o "$out/fast8.nii.gz" --overwrite 2>&1 | tee "$out/fast8.txt" | tail -1
T $d3ip reconstruct examples/mni_t1.nii.gz --task sparse-view --grid 128 --preset paper \
    --device cuda -o "$out/paper20.nii.gz" --overwrite 2>&1 | tee "$out/paper20.txt" | tail -1

$d3ip benchmark --suite claims --device cuda ${prior:+--prior "$prior"} -o "$out/claims_fast" --overwrite
$d3ip benchmark --suite claims --preset paper --device cuda ${prior:+--prior "$prior"} -o "$out/claims_paper" --overwrite
