#!/usr/bin/env bash
# The Fashion-MNIST runs of convnext_v2_fcmae (with GRN) and convnext_v2_fcmae_nogrn, in order:
# FCMAE pretraining (5 epochs, mask ratio 0.6 of the 7x7 grid of 4x4-pixel patches), fine-tuning
# from its best checkpoint (2 epochs), and the same classifier from scratch (7 epochs = 5 + 2).
# Every run: 10,000 training images, 2,000 held-out validation images, the full 10,000-image test
# split, the model's default recipe (AdamW lr 2e-3, weight decay 0.05, batch 128, cosine with
# 1 warm-up epoch, EMA 0.999). A run with a summary.json is done and skipped; an interrupted one
# resumes from its last.pt. Then the inpainting comparison of each pretrained checkpoint.
set -euo pipefail
DATA=${FASHION_MNIST:-/work/shared/data/fashion-mnist}
OUT=${RUNS:-runs/convnext}
RESULTS=bench/results/training
COMMON=(--data-dir "$DATA" --device cpu --train-samples 10000 --val-samples 2000 --no-progress --no-viz --resume)
run() {  # run DIR ARGS...: train unless DIR already holds a finished run
  local dir=$1
  shift
  [ -f "$dir/summary.json" ] || python -m fastvision train "$@" --run-dir "$dir" "${COMMON[@]}"
}
for model in convnext_v2_fcmae convnext_v2_fcmae_nogrn; do
  run "$OUT/${model}_pretrain" "$model" --task fcmae --mask-ratio 0.6 --epochs 5
  python -m fastvision.train.inpainting_eval "$model" --checkpoint "$OUT/${model}_pretrain/best.pt" \
    --data-dir "$DATA" --samples 1000 --seed 0 --out "$RESULTS/${model}_inpainting"
  run "$OUT/${model}_finetune" "$model" --init-from "$OUT/${model}_pretrain/best.pt" --epochs 2
  run "$OUT/${model}_scratch" "$model" --epochs 7
done
