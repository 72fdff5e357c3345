"""Capacity check: fit 4 training thumbnails (all 1024 pixels each) for 200 AdamW steps; PSNR on them.

Usage: python bench/results/training/inr/overfit.py MODEL (data: runs/inr_data/combined, see README.md).
"""

import json
import sys
import time

import torch
import torch.nn.functional as F

from fastvision.data import build_dataset
from fastvision.models import create_model
from fastvision.train.metrics import psnr

torch.manual_seed(0)
name = sys.argv[1]
dataset = build_dataset("photos", "train", "runs/inr_data/combined", num_samples=64, seed=0)
images = torch.stack([dataset[i][0] for i in range(4)])
model = create_model(name)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
start = time.perf_counter()
log = {}
for step in range(1, 201):
    loss = F.mse_loss(model(images), images)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    if step in (50, 100, 200):
        with torch.no_grad():
            model.eval()
            log[step] = float(psnr(model(images).clamp(0, 1), images).mean())
            model.train()
mean = images.mean((2, 3), keepdim=True).expand_as(images)
result = {
    "model": name,
    "psnr_on_fitted_images_by_step": log,
    "mean_colour_psnr": float(psnr(mean, images).mean()),
    "seconds": time.perf_counter() - start,
}
print(json.dumps(result))
