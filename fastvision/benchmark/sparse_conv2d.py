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
from fastvision.benchmark.timing import distribution_version
from fastvision.ops import OPS
from fastvision.ops.sparse_conv2d import dense_weight, sparse_conv2d, sparse_conv2d_reference, sparse_weight
from fastvision.sparse import SparseTensor

DENSITIES = (0.005, 0.01, 0.02, 0.05, 0.10, 0.25)
CROSSOVER_DENSITIES = (*DENSITIES, 0.5, 0.75)  # the crossover report goes on until dense wins
GOAL_CANVAS, GOAL_DENSITY, GOAL_CHANNELS = (8, 512), 0.25, (64, 128)  # the GPU layer goal cases
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


def _spconv_triton():
    """``spconv_triton.pytorch`` when installed (a carried wheel on the GPU machine), else None."""
    try:
        import spconv_triton.pytorch as spconv
    except ImportError:
        return None
    return spconv


def _spconv_layer(spconv, x: SparseTensor, weight: torch.Tensor):
    """A spconv-triton ``SubMConv2d`` holding ``weight`` (its KRSC layout: ``[Cout, kh, kw, Cin]``) and
    the input as its ``SparseConvTensor``, whose index-pair cache is filled by one warm-up call."""
    kernel_size = round(weight.shape[0] ** 0.5)
    conv = spconv.SubMConv2d(weight.shape[1], weight.shape[2], kernel_size, padding=kernel_size // 2,
                             bias=False, indice_key="fastvision_bench")  # fmt: skip
    conv = conv.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(dense_weight(weight.detach()).permute(0, 2, 3, 1))
    indices = x.coords.to(torch.int32).contiguous()
    tensor = spconv.SparseConvTensor(x.feats, indices, list(x.spatial_shape), x.batch_size)
    conv(tensor)  # builds the index pairs once; later calls on `tensor` reuse them
    return conv, tensor


def _dense_channels_last(x: SparseTensor) -> torch.Tensor:
    return x.to_dense().contiguous(memory_format=torch.channels_last)


def _read_sites(dense: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    return dense.permute(0, 2, 3, 1)[coords[:, 0], coords[:, 1], coords[:, 2]]


def _layer_cases(
    images: torch.Tensor, channels: int, device: torch.device, dtype: torch.dtype = torch.float32,
    backward: bool = False,
) -> list[BenchCase]:  # fmt: skip
    """One 3x3 ``channels -> channels`` conv on the active sites of ``images``: forward and, with
    ``backward``, forward+backward (gradients of feats and weight). Rows: the definition, the op's
    backends, dense cuDNN/mkldnn ``F.conv2d`` on the whole canvas in channels-last (a baseline: the
    dense layer alone, its input already dense), and spconv-triton's ``SubMConv2d`` when installed
    (its index pairs built once outside the timed region, as ours)."""
    generator = torch.Generator().manual_seed(2)
    base = SparseTensor.from_dense(images)
    feats = torch.randn(base.num_sites, channels, generator=generator).to(device=device, dtype=dtype)
    x = base.replace_feats(feats)
    weight = (torch.randn(9, channels, channels, generator=generator) / (9 * channels) ** 0.5).to(
        device, dtype
    )
    kernel_map = x.kernel_map(3)
    density = x.num_sites / (images.shape[0] * images.shape[2] * images.shape[3])
    dense_in = _dense_channels_last(x)
    dense_w = dense_weight(weight).contiguous(memory_format=torch.channels_last)
    coords = x.coords
    spconv = _spconv_triton()
    peer = _spconv_layer(spconv, x, weight) if spconv is not None and device.type == "cuda" else None
    cost = OPS["sparse_conv2d"].cost_of(x.feats, kernel_map, weight)
    shape = f"{channels}->{channels} {images.shape[0]}x{images.shape[2]}x{images.shape[3]}"
    label_dtype = "" if dtype == torch.float32 else f" {str(dtype).removeprefix('torch.')}"
    notes = {
        "reference": "dense F.conv2d over the whole canvas, read at the active sites",
        "gather_gemm": "index_select + mm + index_add_ per kernel offset (the op's torch-ops backend)",
        "dense": "F.conv2d on the dense canvas in channels-last (input already dense; read at the sites "
        "only when checked)",
    }
    if peer is not None:
        version = distribution_version("spconv-triton")
        notes["spconv"] = f"spconv-triton {version} SubMConv2d, index pairs built before timing"
    tolerance = (1e-4, 1e-4) if dtype == torch.float32 else (3e-2, 3e-2)
    backends = [b for b in ("triton", "cpu") if b in OPS["sparse_conv2d"].runnable(device)]

    forward_impls = {
        "reference": lambda: sparse_conv2d_reference(x, weight),
        "gather_gemm": backend_impl("reference", lambda: sparse_conv2d(x.feats, kernel_map, weight)),
        **{b: backend_impl(b, lambda: sparse_conv2d(x.feats, kernel_map, weight)) for b in backends},
        "dense": lambda: F.conv2d(dense_in, dense_w, padding=1),
    }
    adapt = {"dense": lambda out: _read_sites(out, coords)}
    if peer is not None:
        forward_impls["spconv"] = lambda: peer[0](peer[1]).features

    def with_fresh_map():
        fresh = SparseTensor(x.coords, x.feats, x.spatial_shape, x.batch_size, check=False)
        return sparse_conv2d(fresh.feats, fresh.kernel_map(3), weight)

    forward_impls["sparse+map"] = with_fresh_map
    cases = [
        BenchCase(
            op="sparse_conv2d",
            label=f"layer fwd {shape}{label_dtype} density {density:.3f}",
            impls=forward_impls,
            flops=cost.flops,
            bytes_moved=cost.bytes_moved,
            dtype=dtype,
            tolerance=tolerance,
            notes=notes,
            adapt=adapt,
            baselines=("dense",),
            peer="spconv" if peer is not None else None,
        )
    ]
    if not backward:
        return cases

    grad_out = torch.randn(x.num_sites, channels, generator=generator).to(device, dtype)
    dense_grad = torch.zeros_like(dense_in.float()).permute(0, 2, 3, 1)
    dense_grad[coords[:, 0], coords[:, 1], coords[:, 2]] = grad_out.float()
    dense_grad = dense_grad.permute(0, 3, 1, 2).to(dtype).contiguous(memory_format=torch.channels_last)
    # Weight gradients sum over every site: scaled by 1/sqrt(N) (inside every timed call alike) so that
    # one tolerance serves both gradients.
    weight_scale = max(x.num_sites, 1) ** -0.5
    feats_leaf = x.feats.detach().requires_grad_(True)
    weight_leaf = weight.detach().requires_grad_(True)

    def sparse_grads(run):
        def grads():
            out = run()
            g_feats, g_weight = torch.autograd.grad(out, (feats_leaf, weight_leaf), grad_out)
            return g_feats, g_weight * weight_scale

        return grads

    def dense_grads():
        dense_leaf = dense_in.detach().requires_grad_(True)
        w_leaf = dense_w.detach().requires_grad_(True)
        out = F.conv2d(dense_leaf, w_leaf, padding=1)
        g_in, g_w = torch.autograd.grad(out, (dense_leaf, w_leaf), dense_grad)
        return g_in, g_w * weight_scale

    leaf_x = x.replace_feats(feats_leaf)
    backward_impls = {
        "reference": sparse_grads(lambda: sparse_conv2d_reference(leaf_x, weight_leaf)),
        "gather_gemm": backend_impl(
            "reference", sparse_grads(lambda: sparse_conv2d(feats_leaf, kernel_map, weight_leaf))
        ),
        **{
            b: backend_impl(b, sparse_grads(lambda: sparse_conv2d(feats_leaf, kernel_map, weight_leaf)))
            for b in backends
        },
        "dense": dense_grads,
    }
    backward_adapt = {"dense": lambda g: (_read_sites(g[0], coords), sparse_weight(g[1]))}
    if peer is not None:
        conv, tensor = peer
        peer_feats = x.feats.detach().requires_grad_(True)
        peer_tensor = tensor.replace_feature(peer_feats)

        def spconv_grads():
            out = conv(peer_tensor).features
            g_feats, g_weight = torch.autograd.grad(out, (peer_feats, conv.weight), grad_out)
            return g_feats, g_weight * weight_scale

        backward_impls["spconv"] = spconv_grads
        backward_adapt["spconv"] = lambda g: (g[0], g[1].permute(1, 2, 3, 0).reshape(weight.shape))
    cases.append(
        BenchCase(
            op="sparse_conv2d",
            label=f"layer fwd+bwd {shape}{label_dtype} density {density:.3f}",
            impls=backward_impls,
            flops=3 * cost.flops,
            bytes_moved=3 * cost.bytes_moved,
            dtype=dtype,
            tolerance=tolerance,
            notes=notes,
            adapt=backward_adapt,
            baselines=("dense",),
            peer="spconv" if peer is not None else None,
        )
    )
    return cases


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
        result.extend(_layer_cases(images, 32, device))
        if _have_max_pool():
            result.extend(_encoder_cases(images, device, with_compile=not quick))
    if device.type == "cuda" and not quick:
        # The sparse-convolution goal: 3x3 submanifold, bf16, 8 x 512^2 at 25 % density.
        images = scattered_digits(*GOAL_CANVAS, GOAL_DENSITY, seed=7, device=device)
        for channels in GOAL_CHANNELS:
            result.extend(_layer_cases(images, channels, device, torch.bfloat16, backward=True))
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


def crossover_density(rows: list[dict[str, float]], label: str, dense: str = "reference") -> float | None:
    """The first measured density at which the sparse path is no faster than the dense one."""
    for row in rows:
        if row[f"{label} sparse"] >= row[f"{label} {dense}"]:
            return row["density"]
    return None


def _fastest_backend(impls) -> str:
    return next(name for name in ("triton", "cpu", "gather_gemm") if name in impls)


def layer_crossover_table(
    device: torch.device,
    channels: int,
    dtype: torch.dtype,
    batch: int,
    size: int,
    densities=CROSSOVER_DENSITIES,
    budget_s: float = 0.5,
) -> list[dict[str, float]]:
    """One 3x3 layer's timings (ms) per density: the sparse op on its first backend (kernel map
    prebuilt) against dense ``F.conv2d`` in channels-last, forward and forward+backward."""
    from fastvision.benchmark.timing import median_time_ms

    rows = []
    for density in densities:
        images = scattered_digits(batch, size, density, seed=round(density * 1e4), device=device)
        fwd, bwd = _layer_cases(images, channels, device, dtype, backward=True)
        row = {"density": float((images != 0).float().mean())}
        for label, case in (("fwd", fwd), ("fwd+bwd", bwd)):
            row[f"{label} dense"] = median_time_ms(case.impls["dense"], device, budget_s=budget_s)
            sparse = case.impls[_fastest_backend(case.impls)]
            row[f"{label} sparse"] = median_time_ms(sparse, device, budget_s=budget_s)
        rows.append(row)
    return rows


def _print_crossover(rows: list[dict[str, float]], dense: str) -> None:
    print(f"{'density':>8} | {'fwd dense':>10} {'fwd sparse':>10} {'ratio':>6} | "
          f"{'f+b dense':>10} {'f+b sparse':>10} {'ratio':>6}")  # fmt: skip
    for row in rows:
        cells = []
        for label in ("fwd", "fwd+bwd"):
            dense_ms, sparse_ms = row[f"{label} {dense}"], row[f"{label} sparse"]
            cells.append(f"{dense_ms:8.2f}ms {sparse_ms:8.2f}ms {dense_ms / sparse_ms:5.2f}x")
        print(f"{row['density']:8.3%} | " + " | ".join(cells))
    for label in ("fwd", "fwd+bwd"):
        density = crossover_density(rows, label, dense)
        where = f"at about {density:.1%}" if density is not None else "above the largest density measured"
        print(f"{label}: dense is as fast as sparse {where}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--budget", type=float, default=0.5, help="seconds of timing per implementation")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument(
        "--layer", type=int, action="append", metavar="CHANNELS",
        help="time one 3x3 CHANNELS -> CHANNELS layer against dense F.conv2d instead of the encoder "
        "(repeatable: one crossover per channel count)",
    )  # fmt: skip
    parser.add_argument(
        "--dtype", choices=("float32", "float16", "bfloat16"), default=None,
        help="the layer's dtype (default: bfloat16 on a GPU, float32 on the CPU)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = f"{device}, {torch.get_num_threads()} threads" if device.type == "cpu" else str(device)
    canvas = f"{args.batch}x1x{args.size}x{args.size}"
    if args.layer:
        dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
        for channels in args.layer:
            rows = layer_crossover_table(device, channels, dtype, args.batch, args.size, budget_s=args.budget)
            name = str(dtype).removeprefix("torch.")
            print(f"3x3 submanifold layer {channels}->{channels} {name}, {canvas} on {where}, "
                  "dense: F.conv2d channels-last")  # fmt: skip
            _print_crossover(rows, "dense")
        return
    rows = crossover_table(device, args.batch, args.size, budget_s=args.budget)
    print(f"sparse U-Net encoder (1->32->64, two pools), {canvas} on {where}")
    _print_crossover(rows, "reference")


if __name__ == "__main__":
    main()
