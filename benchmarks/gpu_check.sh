#!/usr/bin/env bash
# GPU check (issue: run on GPUs): every method for 3 steps on CUDA in bf16 on 1 GPU, replicate and
# fsdp, then fsdp on 2 GPUs when there are 2; one JSON line each (s/step, peak GPU memory, loss
# first/last, parameter + gradient + optimizer MB per rank). Run from the repository root with
# the project's environment: `bash benchmarks/gpu_check.sh`. Test it on the CPU with DEVICE=cpu.
set -euo pipefail
DEVICE="${DEVICE:-cuda}"
PY="${PY:-python}"
DTYPE=bf16
for strategy in replicate fsdp; do
  HF_HUB_OFFLINE=1 "$PY" benchmarks/memory.py --device "$DEVICE" --dtype "$DTYPE" --strategy "$strategy" --ranks 1
done
if [ "$DEVICE" = cuda ] && [ "$("$PY" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  HF_HUB_OFFLINE=1 "$PY" benchmarks/memory.py --device cuda --dtype "$DTYPE" --strategy fsdp --ranks 2
fi
