#!/usr/bin/env bash
# Runs after commands.sh: each variant from scratch for 2 epochs, as many labelled epochs as the
# fine-tuning had. Same data and recipe as commands.sh.
set -euo pipefail
DATA=${FASHION_MNIST:-/work/shared/data/fashion-mnist}
OUT=${RUNS:-runs/convnext}
COMMON=(--data-dir "$DATA" --device cpu --train-samples 10000 --val-samples 2000 --no-progress --no-viz --resume)
run() {  # run DIR ARGS...: train unless DIR already holds a finished run
  local dir=$1
  shift
  [ -f "$dir/summary.json" ] || python -m fastvision train "$@" --run-dir "$dir" "${COMMON[@]}"
}
for model in convnext_v2_fcmae convnext_v2_fcmae_nogrn; do
  run "$OUT/${model}_scratch2" "$model" --epochs 2
done
# A second seed of the fine-tuning and both scratch runs, for the run-to-run spread: the seed sets
# the training subset, validation images and data order (and the scratch initialisation); the
# fine-tuning starts from the same pretrained checkpoints.
for model in convnext_v2_fcmae convnext_v2_fcmae_nogrn; do
  run "$OUT/${model}_finetune_seed1" "$model" --init-from "$OUT/${model}_pretrain/best.pt" --epochs 2 --seed 1
  run "$OUT/${model}_scratch2_seed1" "$model" --epochs 2 --seed 1
  run "$OUT/${model}_scratch_seed1" "$model" --epochs 7 --seed 1
done
