"""Training-step throughput of each architecture: forward + backward of the task loss on one batch
(images/s), with fastvision's kernels ("fastvision": automatic backends), on the reference backend
("reference": plain PyTorch ops, same weights), and ``torch.compile`` of the reference model.

The optimizer step is left out (identical in all three) so that repeated calls see the same
weights; dropout is re-seeded per call so that every implementation computes the same loss.
"""

from __future__ import annotations

import copy

import torch

from fastvision._backend import use_backend
from fastvision.benchmark.case import BenchCase
from fastvision.models import create_model, get_model_spec
from fastvision.train.config import TrainConfig
from fastvision.train.tasks import get_task

# model -> (input shape of one image, batch on CUDA, batch for quick/CPU cases)
MODELS = {
    "vit_mnist": ((1, 28, 28), 256, 8),
    "digit_seq_transformer": ((1, 56, 56), 128, 4),
    "sparse_unet_mnist": ((1, 28, 28), 256, 8),
    "sparse_moe_denoiser": ((3, 32, 32), 64, 4),
}


def _batch(name: str, batch_size: int, device: torch.device, generator: torch.Generator):
    shape = MODELS[name][0]
    images = torch.rand((batch_size, *shape), generator=generator)
    if name in ("vit_mnist", "sparse_unet_mnist", "digit_seq_transformer"):
        images = images * (images > 0.8)  # digit-like: mostly exact-zero background
    task = get_model_spec(name).task
    if task == "digit_sequence":
        targets = torch.randint(0, 10, (batch_size, 4), generator=generator)
    elif task == "classification":
        targets = torch.randint(0, 10, (batch_size,), generator=generator)
    else:
        targets = torch.zeros(batch_size, dtype=torch.long)
    return images.to(device), targets.to(device)


def _step_fn(model: torch.nn.Module, task, batch, backend: str | None):
    cfg = TrainConfig()

    def step():
        torch.manual_seed(0)  # same dropout masks and denoising noise in every implementation
        with use_backend(backend):
            model.zero_grad(set_to_none=True)
            result = task.train_step(model, batch, cfg)
            result.loss.backward()
        return result.loss.detach()

    return step


def cases(device: torch.device, quick: bool) -> list[BenchCase]:
    generator = torch.Generator().manual_seed(0)
    result = []
    for name, (_, cuda_batch, small_batch) in MODELS.items():
        batch_size = small_batch if quick or device.type != "cuda" else cuda_batch
        torch.manual_seed(0)
        model = create_model(name).to(device).train()
        task = get_task(get_model_spec(name).task)
        batch = _batch(name, batch_size, device, generator)
        impls = {
            "reference": _step_fn(model, task, batch, "reference"),
            "fastvision": _step_fn(copy.deepcopy(model), task, batch, None),
        }
        if not quick:  # compiling a whole model takes minutes on a CPU
            # fallback_random: dropout draws from the eager generator, so the compiled step computes
            # the same loss as the others and passes the check (Inductor's own RNG gives other masks).
            compiled = torch.compile(copy.deepcopy(model), options={"fallback_random": True})
            impls["compile"] = _step_fn(compiled, task, batch, "reference")
        result.append(
            BenchCase(
                op="train_step",
                label=f"{name} batch {batch_size}",
                impls=impls,
                items=batch_size,
                tolerance=(1e-4, 1e-3),
                notes={"fastvision": "automatic backend choice per op (the package's default)"},
            )
        )
    return result
