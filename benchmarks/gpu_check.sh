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
# GRPO with DAPO's dynamic sampling and beta 0 (groups without a signal resampled, then not forwarded)
# on the device, from the untrained tiny default: the rows, rewards and advantages of several
# sampling rounds joined where the samples live on the GPU. One JSON line: the run's summary.
T="$(mktemp -d)"
HF_HUB_OFFLINE=1 "$PY" -m rlhfkit.cli.main tiny --out "$T/tiny" >/dev/null
HF_HUB_OFFLINE=1 "$PY" -m rlhfkit.cli.main grpo --config grpo_tiny "model=$T/tiny/base" \
  "train_data=$T/tiny/data/prompts_train.jsonl" eval_data=null rewards=contains_answer beta=0 loss_type=dapo \
  dynamic_sampling=true max_sampling_rounds=3 group_size=4 prompts_per_step=8 "train.device=$DEVICE" \
  train.max_steps=3 train.log_every=1 train.progress=false "train.out_dir=$T/grpo" \
  | "$PY" -c 'import json, sys; s = json.loads(sys.stdin.read()); print(json.dumps({"check": "grpo dynamic sampling", "device": sys.argv[1], "steps": s["steps"], "reward_mean": s.get("reward_mean")}))' "$DEVICE"
rm -rf "$T"
