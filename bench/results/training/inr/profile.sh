#!/bin/bash
# One fresh process per model: training-step throughput and peak resident memory.
cd /work/main
for m in mamba_ginr_small scent_small mamba_ginr_scent_small; do
  OMP_NUM_THREADS=1 .venv/bin/python -m fastvision.train.inr_eval profile $m --batch-size 32 --queries 256 --steps 2
done
for m in mamba_ginr scent mamba_ginr_scent; do
  OMP_NUM_THREADS=1 .venv/bin/python -m fastvision.train.inr_eval profile $m --batch-size 8 --queries 256 --steps 1
done
