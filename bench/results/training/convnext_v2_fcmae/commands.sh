#!/usr/bin/env bash
# The Fashion-MNIST runs of convnext_v2_fcmae (with GRN) and convnext_v2_fcmae_nogrn, in order:
# FCMAE pretraining (5 epochs), fine-tuning from its best checkpoint (3 epochs), and the same
# classifier from scratch (8 epochs = 5 + 3). Every run: 10,000 training images, 2,000 held-out
# validation images, the full 10,000-image test split, the model's default recipe (AdamW lr 2e-3,
# weight decay 0.05, batch 128, cosine with 1 warm-up epoch, EMA 0.999). Each run resumes when
# started again (--resume).
set -euo pipefail
DATA=${FASHION_MNIST:-/work/shared/data/fashion-mnist}
OUT=${RUNS:-runs/convnext}
COMMON=(--data-dir "$DATA" --device cpu --train-samples 10000 --val-samples 2000 --no-progress --no-viz --resume)
for model in convnext_v2_fcmae convnext_v2_fcmae_nogrn; do
  python -m fastvision train "$model" --task fcmae --mask-ratio 0.6 --epochs 5 \
    --run-dir "$OUT/${model}_pretrain" "${COMMON[@]}"
  python -m fastvision train "$model" --init-from "$OUT/${model}_pretrain/best.pt" --epochs 3 \
    --run-dir "$OUT/${model}_finetune" "${COMMON[@]}"
  python -m fastvision train "$model" --epochs 8 --run-dir "$OUT/${model}_scratch" "${COMMON[@]}"
done
