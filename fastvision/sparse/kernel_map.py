"""Kernel maps of 2-D submanifold sparse convolution.

A submanifold convolution computes outputs only at the active input sites. For a ``K x K`` kernel
(``K`` odd, radius ``r = K // 2``) with dilation ``d``, offset ``k = (dy + r) * K + (dx + r)``
pairs every output site ``o`` with the input site ``i`` at ``o + (dy * d, dx * d)`` when that site
is active. The pairs of all offsets are stored back to back (CSR-like), offset by offset:

    out[o] = sum over k, over pairs (i, o) of offset k:  feats[i] @ weight[k]

This matches ``F.conv2d(padding=r * d, dilation=d)`` on the densified input with the dense weight
``weight.view(K, K, Cin, Cout).permute(3, 2, 0, 1)``, read only at the active sites.

The map is built on the tensors' device with plain torch ops: coordinates in canonical order are
sorted int64 keys ``(b * H + y) * W + x``. On a canvas of moderate size a dense grid of site indices
finds each neighbour with one gather; on a large sparse canvas ``torch.searchsorted`` of the
neighbours' keys finds them in ``O(N log N)``, with no hash table either way. The keys must not
overflow: ``B * H * W`` is bounded by :data:`MAX_SITES` (``2**62``, which also leaves room for the
shifted neighbour keys).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import InitVar, dataclass

import torch

# Largest B * H * W: every key (b * H + y) * W + x, and every in-bounds neighbour coordinate, then
# fits int64 with room to spare (2**62 < 2**63 - 1).
MAX_SITES = 2**62
# build_kernel_map looks neighbours up in a dense canvas of site indices up to this many B * H * W
# sites (or 8 per kernel-map entry, where more), else by binary search of the sorted keys.
DENSE_GRID_SITES = 2**22


def check_key_range(spatial_shape: tuple[int, int], batch_size: int) -> None:
    """``ValueError`` unless ``batch_size * H * W`` (batch 0 counts as 1) is at most :data:`MAX_SITES`."""
    height, width = spatial_shape
    total = max(batch_size, 1) * height * width  # Python ints: exact
    if total > MAX_SITES:
        raise ValueError(
            f"batch_size * H * W must be at most 2**62 (the coordinate keys (b * H + y) * W + x are "
            f"int64), got {max(batch_size, 1)} * {height} * {width} = {total}"
        )


def coords_to_keys(coords: torch.Tensor, spatial_shape: tuple[int, int]) -> torch.Tensor:
    """int64 keys ``(b * H + y) * W + x``: ascending keys are the canonical (b, y, x) order.

    Exact when every coordinate lies in ``[0, B) x [0, H) x [0, W)`` with ``B * H * W <= 2**62``
    (:func:`check_key_range`; a :class:`~fastvision.sparse.SparseTensor` checks both)."""
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

    Construction validates the map (``check=False`` skips it, for maps known to be well formed):
    dtypes, shapes and devices always; outside torch.compile / torch.export tracing also the values,
    once, in one host sync: indices in range, ``offset_starts`` from 0 to ``P`` without decreasing,
    the pairs and ``neighbors`` describing the same map with at most one pair per (output, offset),
    the centre offset pairing every site with itself, and the map symmetric (``o`` is ``i``'s
    neighbour at the mirrored offset ``K*K - 1 - k`` exactly when ``i`` is ``o``'s at ``k``), as
    every submanifold map is and as the kernels' input gradients rely on.
    """

    in_indices: torch.Tensor
    out_indices: torch.Tensor
    offset_starts: torch.Tensor
    kernel_size: int
    dilation: int
    num_sites: int
    neighbors: torch.Tensor
    check: InitVar[bool] = True

    def __post_init__(self, check: bool) -> None:
        if check:
            self.check_structure()
            if not torch.compiler.is_compiling():
                self._check_values()
                self._mark_values_checked()

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
        moved = KernelMap(
            self.in_indices.to(device),
            self.out_indices.to(device),
            self.offset_starts,
            self.kernel_size,
            self.dilation,
            self.num_sites,
            self.neighbors.to(device),
            check=False,
        )
        if self._values_checked:
            moved._mark_values_checked()
        return moved

    def check_table(self) -> None:
        """``ValueError`` unless ``neighbors`` holds indices in ``[-1, num_sites)`` and is symmetric:
        what the kernels that read the table rely on. Free for a map validated on construction or
        built by :func:`build_kernel_map`; otherwise one host sync, once per unmodified table."""
        if not self._values_checked:
            check_neighbor_table(
                self.neighbors, self.num_sites, self.num_offsets, symmetric=True, op="sparse_conv2d"
            )

    @property
    def _values_checked(self) -> bool:
        return self.__dict__.get("_values_known", False)

    def _mark_values_checked(self) -> None:
        object.__setattr__(self, "_values_known", True)  # frozen: not a field, not compared

    def check_structure(self) -> None:
        """Types, dtypes, shapes and devices (no values: traceable, no host sync)."""
        check_kernel_size(self.kernel_size, self.dilation)
        if isinstance(self.num_sites, bool) or not isinstance(self.num_sites, int) or self.num_sites < 0:
            raise ValueError(f"kernel_map num_sites must be a non-negative int, got {self.num_sites!r}")
        num_offsets = self.num_offsets
        for name, dtype, dims in (
            ("in_indices", torch.int64, 1),
            ("out_indices", torch.int64, 1),
            ("offset_starts", torch.int64, 1),
            ("neighbors", torch.int32, 2),
        ):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"kernel_map {name} must be a torch.Tensor, got {type(value).__name__}")
            if value.dtype != dtype or value.dim() != dims:
                raise TypeError(
                    f"kernel_map {name} must be a {dims}-D {dtype} tensor, got {value.dim()}-D {value.dtype}"
                )
        if self.out_indices.shape != self.in_indices.shape:
            raise ValueError(
                f"kernel_map in_indices and out_indices must have one length, got "
                f"{self.in_indices.shape[0]} and {self.out_indices.shape[0]}"
            )
        if self.offset_starts.shape != (num_offsets + 1,) or self.offset_starts.device.type != "cpu":
            raise ValueError(
                f"kernel_map offset_starts must be a CPU tensor of K*K + 1 = {num_offsets + 1} entries "
                f"for kernel_size {self.kernel_size}, got {tuple(self.offset_starts.shape)} on "
                f"{self.offset_starts.device}"
            )
        if self.neighbors.shape != (self.num_sites, num_offsets):
            raise ValueError(
                f"kernel_map neighbors must have shape [num_sites, K*K] = [{self.num_sites}, {num_offsets}], "
                f"got {tuple(self.neighbors.shape)}"
            )
        if not (self.in_indices.device == self.out_indices.device == self.neighbors.device):
            raise ValueError(
                f"kernel_map in_indices, out_indices and neighbors must be on one device, got "
                f"{self.in_indices.device}, {self.out_indices.device} and {self.neighbors.device}"
            )

    def _check_values(self) -> None:
        """The value invariants of the class docstring (one host sync)."""
        _check_offset_starts(self.offset_starts, self.in_indices.shape[0], "kernel_map offset_starts")
        num_sites, num_offsets = self.num_sites, self.num_offsets
        if num_sites == 0:
            return  # no pairs (P = offset_starts[-1] = 0 checked above), an empty [0, K*K] table
        device = self.neighbors.device
        neighbors = self.neighbors.long()
        starts = self.offset_starts.tolist()
        counts = torch.tensor([b - a for a, b in zip(starts, starts[1:], strict=False)], device=device)
        offset_of_pair = torch.repeat_interleave(torch.arange(num_offsets, device=device), counts)
        ins, outs = self.in_indices, self.out_indices
        pairs = ins.shape[0]
        present = neighbors >= 0
        if pairs:
            o, k = outs.clamp(0, num_sites - 1), offset_of_pair
            hits = torch.zeros_like(present)
            hits[o, k] = True
            same = (neighbors[o, k] == ins).all() & (present.sum() == pairs) & (hits.sum() == pairs)
        else:
            same = ~present.any()
        sites = torch.arange(num_sites, device=device)
        flags = [
            _in_range(ins, 0, num_sites),
            _in_range(outs, 0, num_sites),
            _in_range(neighbors, -1, num_sites),
            same,
            (neighbors[:, self.center] == sites).all(),
            _symmetric(neighbors),
        ]
        messages = (
            f"kernel_map in_indices must lie in [0, num_sites = {num_sites})",
            f"kernel_map out_indices must lie in [0, num_sites = {num_sites})",
            _TABLE_RANGE.format(name="kernel_map neighbors", num_sites=num_sites),
            "kernel_map pairs (in_indices, out_indices, offset_starts) and neighbors must describe the "
            "same map, with at most one pair per output site and offset",
            "kernel_map centre offset must pair every site with itself (a submanifold map)",
            _SYMMETRY.format(name="kernel_map"),
        )
        _raise_first(flags, messages)


_TABLE_RANGE = "{name} entries must be -1 (absent) or a site index in [0, {num_sites})"
_SYMMETRY = (
    "{name} must be symmetric: i is o's neighbour at offset k exactly when o is i's at the mirrored "
    "offset K*K - 1 - k (as in every submanifold map)"
)


def _in_range(values: torch.Tensor, low: int, high: int) -> torch.Tensor:
    if values.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=values.device)
    return (values.min() >= low) & (values.max() < high)


def _symmetric(neighbors: torch.Tensor) -> torch.Tensor:
    """``neighbors[neighbors[o, k], K*K - 1 - k] == o`` wherever ``neighbors[o, k]`` is present
    (entries already known to lie in ``[-1, N)``)."""
    num_sites, num_offsets = neighbors.shape
    neighbors = neighbors.long()
    safe = neighbors.clamp(0, max(num_sites - 1, 0))
    mirror_of = neighbors.flip(1)[safe, torch.arange(num_offsets, device=neighbors.device)]
    sites = torch.arange(num_sites, device=neighbors.device)[:, None]
    return torch.where(neighbors >= 0, mirror_of == sites, True).all()


def _raise_first(flags: list, messages: tuple[str, ...]) -> None:
    """One host sync for every flag; ``ValueError`` with the message of the first that is false."""
    device = next((f.device for f in flags if isinstance(f, torch.Tensor)), None)
    ok = torch.stack([torch.as_tensor(f, device=device) for f in flags]).tolist()
    for good, message in zip(ok, messages, strict=True):
        if not good:
            raise ValueError(message)


def _check_offset_starts(offset_starts: torch.Tensor, pairs: int, name: str) -> None:
    starts = offset_starts.tolist()
    if starts[0] != 0 or starts[-1] != pairs or any(b < a for a, b in zip(starts, starts[1:], strict=False)):
        raise ValueError(
            f"{name} must rise from 0 to the number of pairs {pairs} without decreasing, got {starts}"
        )


# --- checks of the raw map tensors that the registered ops take -----------------------------------
#
# A registered op (torch.ops.fastvision.*) can be called directly with any tensors, so each checks
# what its kernel reads through: every index in range (and, where a kernel relies on it, the map's
# symmetry). The value checks cost one host sync; they run once per tensor and are skipped while
# the same tensor objects, unmodified (same version counter), come back with the same sizes.

_VALIDATED: dict[tuple[int, ...], tuple[tuple, tuple[int, ...], tuple]] = {}


def _versions(tensors: tuple[torch.Tensor, ...]) -> tuple[int, ...] | None:
    try:
        return tuple(t._version for t in tensors)
    except RuntimeError:  # inference tensors have no version counter: never cached
        return None


def _once(tensors: tuple[torch.Tensor, ...], key: tuple, check: Callable[[], None]) -> None:
    ident = tuple(id(t) for t in tensors)
    versions = _versions(tensors)
    seen = _VALIDATED.get(ident)
    if (
        seen is not None
        and versions is not None
        and seen[1] == versions
        and seen[2] == key
        and all(ref() is t for ref, t in zip(seen[0], tensors, strict=True))
    ):
        return
    check()
    if versions is not None:
        if len(_VALIDATED) >= 256:
            _VALIDATED.clear()
        _VALIDATED[ident] = (tuple(weakref.ref(t) for t in tensors), versions, key)


def check_neighbor_table(
    neighbors: torch.Tensor,
    num_sites: int,
    num_offsets: int,
    *,
    symmetric: bool = False,
    op: str = "sparse_conv2d",
) -> None:
    """``ValueError`` unless ``neighbors`` is an int32 ``[num_sites, num_offsets]`` table of entries
    in ``[-1, num_sites)`` (and, with ``symmetric``, a symmetric map)."""
    if not isinstance(neighbors, torch.Tensor) or neighbors.dtype != torch.int32 or neighbors.dim() != 2:
        raise TypeError(f"{op}: neighbors must be a 2-D int32 tensor, got {_describe(neighbors)}")
    if tuple(neighbors.shape) != (num_sites, num_offsets):
        raise ValueError(
            f"{op}: neighbors must have shape [N, K*K] = [{num_sites}, {num_offsets}] (the rows of feats, "
            f"the offsets of weight), got {tuple(neighbors.shape)}"
        )
    if num_sites == 0 or num_offsets == 0:
        return

    def check():
        flags = [_in_range(neighbors, -1, num_sites)]
        messages = [_TABLE_RANGE.format(name=f"{op}: neighbors", num_sites=num_sites)]
        if symmetric:
            flags.append(_symmetric(neighbors))
            messages.append(_SYMMETRY.format(name=f"{op}: neighbors"))
        _raise_first(flags, tuple(messages))

    _once((neighbors,), ("table", num_sites, num_offsets, symmetric), check)


def check_pair_lists(
    in_indices: torch.Tensor,
    out_indices: torch.Tensor,
    offset_starts: torch.Tensor,
    num_sites: int,
    num_offsets: int,
    op: str = "sparse_conv2d",
) -> None:
    """``ValueError`` unless the pair lists index ``[0, num_sites)``, ``offset_starts`` (CPU, int64,
    ``num_offsets + 1`` entries) rises from 0 to ``P``, and a centre offset with ``N`` pairs is the
    identity (the gather-GEMM path multiplies it without a gather)."""
    named = (("in_indices", in_indices), ("out_indices", out_indices), ("offset_starts", offset_starts))
    for name, value in named:
        if not isinstance(value, torch.Tensor) or value.dtype != torch.int64 or value.dim() != 1:
            raise TypeError(f"{op}: {name} must be a 1-D int64 tensor, got {_describe(value)}")
    if out_indices.shape != in_indices.shape:
        raise ValueError(
            f"{op}: in_indices and out_indices must have one length, got {in_indices.shape[0]} and "
            f"{out_indices.shape[0]}"
        )
    if offset_starts.shape != (num_offsets + 1,) or offset_starts.device.type != "cpu":
        raise ValueError(
            f"{op}: offset_starts must be a CPU tensor of K*K + 1 = {num_offsets + 1} entries (weight has "
            f"{num_offsets} offsets), got {tuple(offset_starts.shape)} on {offset_starts.device}"
        )
    pairs = in_indices.shape[0]
    _check_offset_starts(offset_starts, pairs, f"{op}: offset_starts")
    if pairs == 0:
        return

    def check():
        flags = [_in_range(in_indices, 0, num_sites), _in_range(out_indices, 0, num_sites)]
        messages = [f"{op}: {name} must lie in [0, {num_sites})" for name in ("in_indices", "out_indices")]
        start, end = (int(v) for v in offset_starts[num_offsets // 2 : num_offsets // 2 + 2])
        if end - start == num_sites:
            sites = torch.arange(num_sites, device=in_indices.device)
            centre = (in_indices[start:end] == sites).all() & (out_indices[start:end] == sites).all()
            flags.append(centre)
            messages.append(f"{op}: a centre offset with one pair per site must pair every site with itself")
        _raise_first(flags, tuple(messages))

    _once((in_indices, out_indices, offset_starts), ("pairs", num_sites, num_offsets), check)


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dim()}-D {value.dtype} tensor"
    return type(value).__name__


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


def _use_grid(grid_size: int, entries: int) -> bool:
    """Whether to look neighbours up in a canvas of site indices (-1 where inactive): one gather per
    query, no search; used while the canvas costs no more memory than the map (or a few MB)."""
    return grid_size <= max(DENSE_GRID_SITES, 8 * entries)


def build_kernel_map(
    coords: torch.Tensor,
    spatial_shape: tuple[int, int],
    kernel_size: int = 3,
    dilation: int = 1,
    *,
    batch_size: int | None = None,
) -> KernelMap:
    """The submanifold kernel map of ``coords`` (``[N, 3]`` (batch, y, x), canonical order).

    ``coords`` must be sorted and unique, inside ``[0, batch_size) x [0, H) x [0, W)`` (a
    :class:`~fastvision.sparse.SparseTensor` guarantees it); the map is built on ``coords``' device.
    ``batch_size`` (default: the last site's batch index + 1) bounds the keys: ``B * H * W`` must be
    at most ``2**62`` (:func:`check_key_range`), and ``N`` below ``2**31`` (the int32 neighbour table).
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
    if num_sites >= 2**31:
        raise ValueError(
            f"build_kernel_map takes fewer than 2**31 sites (int32 neighbour table), got {num_sites}"
        )
    if batch_size is None:
        batch_size = int(coords[-1, 0]) + 1 if num_sites else 1  # canonical order: the last is the largest
    check_key_range(spatial_shape, batch_size)
    radius = kernel_size // 2
    num_offsets = kernel_size * kernel_size
    keys = coords_to_keys(coords, spatial_shape)
    # All offsets at once, [K*K, N]: one searchsorted, one nonzero (a single host sync). A step
    # longer than the canvas never lands inside it: clamped to the canvas size, no sum overflows.
    limit = max(height, width)
    steps = torch.tensor([max(-limit, min(limit, s * dilation)) for s in range(-radius, radius + 1)])
    steps = steps.to(device)
    dy = steps.repeat_interleave(kernel_size)[:, None]
    dx = steps.repeat(kernel_size)[:, None]
    batch, y, x = coords.long().unbind(1)
    ny, nx = y[None] + dy, x[None] + dx
    inside = (ny >= 0) & (ny < height) & (nx >= 0) & (nx < width)
    # The keys of in-canvas neighbours; out-of-canvas ones (clamped in, so nothing overflows) would
    # alias another site and are masked out.
    query = (batch[None] * height + ny.clamp(0, height - 1)) * width + nx.clamp(0, width - 1)
    grid_size = batch_size * height * width
    if num_sites and _use_grid(grid_size, num_sites * num_offsets):
        grid = torch.full((grid_size,), -1, dtype=torch.int64, device=device)
        grid[keys] = torch.arange(num_sites, device=device)
        found = grid[query]
        match = inside & (found >= 0)
    elif num_sites:
        found = torch.searchsorted(keys, query.reshape(-1)).clamp_(max=num_sites - 1).view_as(query)
        match = inside & (keys[found] == query)
    else:
        found, match = query, inside
    offset_of_pair, out_indices = match.nonzero(as_tuple=True)  # row-major: grouped by offset
    in_indices = found[offset_of_pair, out_indices]
    offset_starts = torch.zeros(num_offsets + 1, dtype=torch.int64)
    offset_starts[1:] = torch.bincount(offset_of_pair, minlength=num_offsets).cpu().cumsum(0)
    neighbors = torch.where(match, found, -1).t().to(torch.int32).contiguous()
    # Well formed by construction (the tests check it against brute force): no value check.
    kernel_map = KernelMap(
        in_indices, out_indices, offset_starts, kernel_size, dilation, num_sites, neighbors, check=False
    )
    kernel_map._mark_values_checked()
    return kernel_map


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
