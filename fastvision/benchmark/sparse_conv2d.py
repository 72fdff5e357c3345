"""Submanifold sparse conv against its dense equivalent, over input densities.

Inputs are digit glyphs scattered on a large canvas (the seed's use case: mostly empty images)
until a target fraction of the sites is active. Two kinds of case:

* ``layer``: one 3x3 conv, 32 -> 32 channels. ``reference`` is the definition (densify,
  ``F.conv2d`` over the whole canvas, read the active sites); ``gather_gemm`` (the op's torch-ops
  backend, named ``reference`` in fastvision.use_backend) and ``triton`` run ``sparse_conv2d`` with
  the kernel map already built (as every layer after the first at one resolution sees it);
  ``sparse+map`` builds the map too (automatic backend choice).
* ``encoder``: the sparse U-Net encoder (ResidualSparseBlock 1->32, max-pool, 32->64, max-pool) from
  a dense image batch (``sparse``, automatic backend choice), against the same network on dense
  tensors (``nn.Conv2d`` weights, each conv masked to the active sites so both compute the same
  function). ``fwd`` and ``fwd+bwd``.

``flops`` counts the useful work (the kernel-map pairs), ``OPS["sparse_conv2d"].cost`` of each conv
(the encoder: summed over its convs and 1x1 projections), so the dense rows' TFLOP/s show how much
of their work is wasted on empty sites. ``python -m fastvision.benchmark.sparse_conv2d`` prints the
encoder timings per density and the crossover density where the sparse path stops winning.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from fastvision.benchmark.case import BenchCase, backend_impl
from fastvision.ops import OPS
from fastvision.ops.sparse_conv2d import dense_weight, sparse_conv2d, sparse_conv2d_reference
from fastvision.sparse import SparseTensor

DENSITIES = (0.005, 0.01, 0.02, 0.05, 0.10, 0.25)
CROSSOVER_DENSITIES = (*DENSITIES, 0.5, 0.75)  # the crossover report goes on until dense wins
GLYPH_THRESHOLD = 0.5  # zero the faint blur of the upscaled embedded digits: stroke-like glyphs


def _glyphs() -> torch.Tensor:
    from fastvision.data import load_embedded_digits

    dataset = load_embedded_digits("train")
    images = torch.stack([dataset[i][0] for i in range(256)])
    return images * (images >= GLYPH_THRESHOLD)


def scattered_digits(
    batch: int, size: int, density: float, seed: int = 0, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``[batch, 1, size, size]`` canvases with digits pasted at random places until ``density`` of
    the pixels are nonzero (background exactly zero)."""
    generator = torch.Generator().manual_seed(seed)
    glyphs = _glyphs()
    glyph = glyphs.shape[-1]
    canvas = torch.zeros(batch, 1, size, size)
    target = density * size * size
    for item in range(batch):
        while (canvas[item] != 0).sum() < target:
            index = int(torch.randint(len(glyphs), (1,), generator=generator))
            y, x = (int(v) for v in torch.randint(size - glyph + 1, (2,), generator=generator))
            patch = canvas[item, :, y : y + glyph, x : x + glyph]
            torch.maximum(patch, glyphs[index], out=patch)
    return canvas.to(device)


def _sparse_encoder(channels: tuple[int, int, int], device: torch.device):
    from fastvision.nn.sparse import ResidualSparseBlock, SparseMaxPool2d

    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(
        [ResidualSparseBlock(channels[0], channels[1]), ResidualSparseBlock(channels[1], channels[2])]
    ).to(device)
    pool = SparseMaxPool2d(2)

    def sparse_forward(images: torch.Tensor) -> torch.Tensor:
        x = SparseTensor.from_dense(images)
        x = pool(blocks[1](pool(blocks[0](x))))
        return x.to_dense()

    def _masked_conv(conv, x, mask):
        pad = (conv.kernel_size // 2) * conv.dilation
        return F.conv2d(x, dense_weight(conv.weight), conv.bias, padding=pad) * mask

    def dense_forward(images: torch.Tensor) -> torch.Tensor:
        x = images
        mask = (images != 0).any(1, keepdim=True).to(images.dtype)
        for block in blocks:
            hidden = F.relu(_masked_conv(block.conv1, x, mask))
            hidden = _masked_conv(block.conv2, hidden, mask)
            residual = x if block.shortcut is None else _masked_conv(block.shortcut, x, mask)
            x = F.max_pool2d(F.relu(hidden + residual), 2)
            mask = F.max_pool2d(mask, 2)
        return x

    return blocks, sparse_forward, dense_forward


def _conv_flops(kernel_map, cin: int, cout: int) -> int:
    """``OPS["sparse_conv2d"].cost`` of one conv (shape-only: meta feats and weight)."""
    feats = torch.empty((kernel_map.num_sites, cin), device="meta")
    weight = torch.empty((kernel_map.num_offsets, cin, cout), device="meta")
    return OPS["sparse_conv2d"].cost(feats, kernel_map, weight, None).flops


def _encoder_flops(images: torch.Tensor, channels: tuple[int, int, int]) -> int:
    """Useful flops of the sparse encoder's convs: each block's two 3x3 convs and, where the channel
    count changes, its 1x1 projection (2 x kernel-map pairs x channel products each)."""
    mask = (images != 0).any(1, keepdim=True).to(torch.float32)
    total = 0
    for cin, cout in ((channels[0], channels[1]), (channels[1], channels[2])):
        x = SparseTensor.from_dense(mask)
        total += _conv_flops(x.kernel_map(3), cin, cout) + _conv_flops(x.kernel_map(3), cout, cout)
        if cin != cout:
            total += _conv_flops(x.kernel_map(1), cin, cout)
        mask = F.max_pool2d(mask, 2)
    return total


def _encoder_cases(images: torch.Tensor, device: torch.device, with_compile: bool) -> list[BenchCase]:
    channels = (1, 32, 64)
    blocks, sparse_forward, dense_forward = _sparse_encoder(channels, device)
    parameters = list(blocks.parameters())
    flops = _encoder_flops(images, channels)
    actual = float((images != 0).float().mean())
    shape = "x".join(str(s) for s in images.shape)
    grad_seed = torch.Generator().manual_seed(1)
    out_shape = (images.shape[0], channels[2], images.shape[2] // 4, images.shape[3] // 4)
    grad_out = torch.randn(out_shape, generator=grad_seed).to(device)

    def fwd_bwd(forward):
        def run():
            out = forward(images)
            return torch.autograd.grad(out, parameters, grad_out)

        return run

    tolerance = (1e-4, 1e-4)
    forward_impls = {
        "reference": lambda: dense_forward(images),
        "sparse": lambda: sparse_forward(images),
    }
    if with_compile:  # tens of seconds to compile on a CPU: not in the quick cases
        forward_impls["compile"] = (lambda f: lambda: f(images))(torch.compile(dense_forward))
    notes = {"sparse": "SparseTensor.from_dense + kernel maps + sparse convs + sparse max-pool + to_dense"}
    return [
        BenchCase(
            op="sparse_conv2d",
            label=f"encoder fwd {shape} density {actual:.3f}",
            impls=forward_impls,
            flops=flops,
            tolerance=tolerance,
            notes=notes,
        ),
        BenchCase(
            op="sparse_conv2d",
            label=f"encoder fwd+bwd {shape} density {actual:.3f}",
            impls={"reference": fwd_bwd(dense_forward), "sparse": fwd_bwd(sparse_forward)},
            flops=3 * flops,
            tolerance=(1e-3, 1e-3),  # weight gradients sum over every site
            notes=notes,
        ),
    ]


def _layer_case(images: torch.Tensor, channels: int, device: torch.device) -> BenchCase:
    generator = torch.Generator().manual_seed(2)
    base = SparseTensor.from_dense(images)
    x = base.replace_feats(torch.randn(base.num_sites, channels, generator=generator).to(device))
    weight = (torch.randn(9, channels, channels, generator=generator) / (9 * channels) ** 0.5).to(device)
    kernel_map = x.kernel_map(3)
    density = x.num_sites / (images.shape[0] * images.shape[2] * images.shape[3])

    triton = {}
    if "triton" in OPS["sparse_conv2d"].runnable(device):
        triton["triton"] = backend_impl("triton", lambda: sparse_conv2d(x.feats, kernel_map, weight))

    def with_fresh_map():
        fresh = SparseTensor(x.coords, x.feats, x.spatial_shape, x.batch_size, check=False)
        return sparse_conv2d(fresh.feats, fresh.kernel_map(3), weight)

    return BenchCase(
        op="sparse_conv2d",
        label=f"layer fwd {channels}->{channels} {images.shape[0]}x{images.shape[2]}x{images.shape[3]} "
        f"density {density:.3f}",
        impls={
            "reference": lambda: sparse_conv2d_reference(x, weight),
            "gather_gemm": backend_impl("reference", lambda: sparse_conv2d(x.feats, kernel_map, weight)),
            **triton,
            "sparse+map": with_fresh_map,
        },
        flops=OPS["sparse_conv2d"].cost_of(x.feats, kernel_map, weight).flops,
        tolerance=(1e-4, 1e-4),
        notes={
            "reference": "dense F.conv2d over the whole canvas, read at the active sites",
            "gather_gemm": "index_select + mm + index_add_ per kernel offset (the op's torch-ops backend)",
        },
    )


def _have_max_pool() -> bool:
    try:
        import fastvision.ops.sparse_max_pool2d  # noqa: F401
    except ImportError:
        return False
    return True


def cases(device: torch.device, quick: bool) -> list[BenchCase]:
    if quick or device.type != "cuda":
        batch, size, densities = 1, 64, (0.02, 0.25)
    else:
        batch, size, densities = 8, 256, DENSITIES
    result = []
    for density in densities:
        images = scattered_digits(batch, size, density, seed=round(density * 1e4), device=device)
        result.append(_layer_case(images, 32, device))
        if _have_max_pool():
            result.extend(_encoder_cases(images, device, with_compile=not quick))
    return result


def crossover_table(
    device: torch.device,
    batch: int = 1,
    size: int = 256,
    densities=CROSSOVER_DENSITIES,
    budget_s: float = 0.5,
) -> list[dict[str, float]]:
    """Encoder timings (ms) per density, sparse vs dense, forward and forward+backward."""
    from fastvision.benchmark.timing import median_time_ms

    rows = []
    for density in densities:
        images = scattered_digits(batch, size, density, seed=round(density * 1e4), device=device)
        fwd, bwd = _encoder_cases(images, device, with_compile=False)
        row = {"density": float((images != 0).float().mean())}
        for label, case in (("fwd", fwd), ("fwd+bwd", bwd)):
            for impl in ("reference", "sparse"):
                row[f"{label} {impl}"] = median_time_ms(case.impls[impl], device, budget_s=budget_s)
        rows.append(row)
    return rows


def crossover_density(rows: list[dict[str, float]], label: str) -> float | None:
    """The first measured density at which the sparse path is no faster than the dense one."""
    for row in rows:
        if row[f"{label} sparse"] >= row[f"{label} reference"]:
            return row["density"]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--budget", type=float, default=0.5, help="seconds of timing per implementation")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = crossover_table(device, args.batch, args.size, budget_s=args.budget)
    where = f"{device}, {torch.get_num_threads()} threads" if device.type == "cpu" else str(device)
    print(f"sparse U-Net encoder (1->32->64, two pools), {args.batch}x1x{args.size}x{args.size} on {where}")
    print(f"{'density':>8} | {'fwd dense':>10} {'fwd sparse':>10} {'ratio':>6} | "
          f"{'f+b dense':>10} {'f+b sparse':>10} {'ratio':>6}")  # fmt: skip
    for row in rows:
        cells = []
        for label in ("fwd", "fwd+bwd"):
            dense, sparse = row[f"{label} reference"], row[f"{label} sparse"]
            cells.append(f"{dense:8.2f}ms {sparse:8.2f}ms {dense / sparse:5.2f}x")
        print(f"{row['density']:8.3%} | " + " | ".join(cells))
    for label in ("fwd", "fwd+bwd"):
        density = crossover_density(rows, label)
        where = f"at about {density:.1%}" if density is not None else "above the largest density measured"
        print(f"{label}: dense is as fast as sparse {where}")


if __name__ == "__main__":
    main()
