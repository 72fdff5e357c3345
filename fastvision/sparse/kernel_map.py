"""Kernel maps of 2-D submanifold sparse convolution.

A submanifold convolution computes outputs only at the active input sites. For a ``K x K`` kernel
(``K`` odd, radius ``r = K // 2``) with dilation ``d``, offset ``k = (dy + r) * K + (dx + r)``
pairs every output site ``o`` with the input site ``i`` at ``o + (dy * d, dx * d)`` when that site
is active. The pairs of all offsets are stored back to back (CSR-like), offset by offset:

    out[o] = sum over k, over pairs (i, o) of offset k:  feats[i] @ weight[k]

This matches ``F.conv2d(padding=r * d, dilation=d)`` on the densified input with the dense weight
``weight.view(K, K, Cin, Cout).permute(3, 2, 0, 1)``, read only at the active sites.

The map is built on the tensors' device with plain torch ops: coordinates in canonical order are
sorted int64 keys ``(b * H + y) * W + x``, so ``torch.searchsorted`` of the shifted keys finds each
neighbour in ``O(N log N)`` with no hash table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def coords_to_keys(coords: torch.Tensor, spatial_shape: tuple[int, int]) -> torch.Tensor:
    """int64 keys ``(b * H + y) * W + x``: ascending keys are the canonical (b, y, x) order."""
    height, width = spatial_shape
    coords = coords.long()
    return (coords[:, 0] * height + coords[:, 1]) * width + coords[:, 2]


@dataclass(frozen=True)
class KernelMap:
    """Input/output index pairs of one submanifold convolution, grouped by kernel offset.

    Attributes:
        in_indices: int64 ``[P]``, the input site of each pair.
        out_indices: int64 ``[P]``, the output site of each pair.
        offset_starts: int64 ``[K*K + 1]`` on the CPU: pairs of offset ``k`` are
            ``[offset_starts[k], offset_starts[k + 1])``.
        kernel_size, dilation: the kernel the map was built for.
        num_sites: the number of active sites (inputs and outputs alike, submanifold).
        neighbors: int32 ``[N, K*K]``, the same map per output site: ``neighbors[o, k]`` is the
            input paired with ``o`` at offset ``k``, or -1 (the layout of the fused Triton kernel).
    """

    in_indices: torch.Tensor
    out_indices: torch.Tensor
    offset_starts: torch.Tensor
    kernel_size: int
    dilation: int
    num_sites: int
    neighbors: torch.Tensor

    @property
    def num_offsets(self) -> int:
        return self.kernel_size * self.kernel_size

    @property
    def center(self) -> int:
        """The offset (0, 0): its pairs are the identity ``(i, i)`` for every site."""
        return self.num_offsets // 2

    def pairs(self, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(in_indices, out_indices)`` of one kernel offset."""
        start, end = int(self.offset_starts[offset]), int(self.offset_starts[offset + 1])
        return self.in_indices[start:end], self.out_indices[start:end]

    def to(self, device: torch.device | str) -> KernelMap:
        return KernelMap(
            self.in_indices.to(device),
            self.out_indices.to(device),
            self.offset_starts,
            self.kernel_size,
            self.dilation,
            self.num_sites,
            self.neighbors.to(device),
        )


def check_kernel_size(kernel_size: int, dilation: int = 1) -> None:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
        raise ValueError(f"kernel_size must be a positive int, got {kernel_size!r}")
    if kernel_size % 2 == 0:
        raise ValueError(
            f"kernel_size must be odd for a submanifold convolution (outputs centred on the "
            f"input sites), got {kernel_size}"
        )
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be a positive int, got {dilation!r}")


def build_kernel_map(
    coords: torch.Tensor, spatial_shape: tuple[int, int], kernel_size: int = 3, dilation: int = 1
) -> KernelMap:
    """The submanifold kernel map of ``coords`` (``[N, 3]`` (batch, y, x), canonical order).

    ``coords`` must be sorted and unique (a :class:`~fastvision.sparse.SparseTensor` guarantees
    it); the map is built on ``coords``' device.
    """
    check_kernel_size(kernel_size, dilation)
    if torch.compiler.is_compiling():
        raise NotImplementedError(
            "build_kernel_map cannot be traced by torch.compile or torch.export: the active sites, and "
            "with them every shape of the map, depend on the input values. Build sparse tensors and "
            "their kernel maps eagerly (the sparse ops themselves trace, given a map built outside)"
        )
    height, width = spatial_shape
    device = coords.device
    num_sites = coords.shape[0]
    radius = kernel_size // 2
    num_offsets = kernel_size * kernel_size
    keys = coords_to_keys(coords, spatial_shape)
    # All offsets at once, [K*K, N]: one searchsorted, one nonzero (a single host sync).
    steps = torch.arange(-radius, radius + 1, device=device) * dilation
    dy = steps.repeat_interleave(kernel_size)[:, None]
    dx = steps.repeat(kernel_size)[:, None]
    ny, nx = coords[:, 1].long()[None] + dy, coords[:, 2].long()[None] + dx
    inside = (ny >= 0) & (ny < height) & (nx >= 0) & (nx < width)
    # Out-of-bounds neighbours would alias another row or batch item in key space: masked out.
    query = keys[None] + dy * width + dx
    if num_sites:
        found = torch.searchsorted(keys, query.reshape(-1)).clamp_(max=num_sites - 1).view_as(query)
        match = inside & (keys[found] == query)
    else:
        found, match = query, inside
    offset_of_pair, out_indices = match.nonzero(as_tuple=True)  # row-major: grouped by offset
    in_indices = found[offset_of_pair, out_indices]
    offset_starts = torch.zeros(num_offsets + 1, dtype=torch.int64)
    offset_starts[1:] = torch.bincount(offset_of_pair, minlength=num_offsets).cpu().cumsum(0)
    neighbors = torch.where(match, found, -1).t().to(torch.int32).contiguous()
    return KernelMap(in_indices, out_indices, offset_starts, kernel_size, dilation, num_sites, neighbors)


def brute_force_kernel_map(
    coords: torch.Tensor, spatial_shape: tuple[int, int], kernel_size: int = 3, dilation: int = 1
) -> list[set[tuple[int, int]]]:
    """Per offset, the set of (input, output) pairs by a dictionary lookup (tests check with it)."""
    height, width = spatial_shape
    radius = kernel_size // 2
    index = {tuple(c): i for i, c in enumerate(coords.tolist())}
    pairs: list[set[tuple[int, int]]] = []
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            found = set()
            for out_index, (b, y, x) in enumerate(coords.tolist()):
                ny, nx = y + dy * dilation, x + dx * dilation
                if 0 <= ny < height and 0 <= nx < width and (b, ny, nx) in index:
                    found.add((index[(b, ny, nx)], out_index))
            pairs.append(found)
    return pairs
