"""``SparseTensor``: a batch of 2-D sparse feature maps (active sites and their features)."""

from __future__ import annotations

from typing import Any

import torch

from fastvision.sparse.kernel_map import (
    KernelMap,
    build_kernel_map,
    check_kernel_size,
    check_key_range,
    coords_to_keys,
)

INDEX_DTYPES = (torch.int32, torch.int64)


def _check_shape_pair(name: str, value: Any) -> tuple[int, int]:
    if (
        not isinstance(value, (tuple, list, torch.Size))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    ):
        raise ValueError(f"{name} must be a pair of positive ints (H, W), got {value!r}")
    return int(value[0]), int(value[1])


class SparseTensor:
    """Active sites of a ``[B, C, H, W]`` feature map: integer coordinates and their features.

    Attributes:
        coords: int64 ``[N, 3]`` rows ``(batch, y, x)``, sorted ascending and unique: the canonical
            order every op in fastvision.sparse relies on (and produces).
        feats: ``[N, C]`` features, row ``i`` belongs to ``coords[i]``.
        spatial_shape: ``(H, W)``.
        batch_size: ``B`` (items may have no active site at all); ``B * H * W`` is at most ``2**62``
            (the int64 coordinate keys, :func:`~fastvision.sparse.kernel_map.check_key_range`).

    Kernel maps depend only on the coordinates, so they are cached in a dict that
    :meth:`replace_feats` shares: every layer at one resolution builds its map once.
    """

    __slots__ = ("coords", "feats", "spatial_shape", "batch_size", "_kernel_maps")

    def __init__(
        self,
        coords: torch.Tensor,
        feats: torch.Tensor,
        spatial_shape: tuple[int, int],
        batch_size: int,
        *,
        check: bool = True,
        kernel_maps: dict | None = None,
    ):
        """``check=True`` validates everything, including the canonical order (one host sync);
        ops that produce canonical coordinates themselves pass ``check=False``."""
        spatial_shape = _check_shape_pair("spatial_shape", spatial_shape)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
            raise ValueError(f"batch_size must be a non-negative int, got {batch_size!r}")
        check_key_range(spatial_shape, batch_size)
        if not isinstance(coords, torch.Tensor):
            raise TypeError(f"coords must be a torch.Tensor, got {type(coords).__name__}")
        if not isinstance(feats, torch.Tensor):
            raise TypeError(f"feats must be a torch.Tensor, got {type(feats).__name__}")
        if coords.dtype not in INDEX_DTYPES:
            raise TypeError(f"coords must have dtype int32 or int64, got {coords.dtype}")
        if coords.dim() != 2 or coords.shape[1] != 3:
            raise ValueError(f"coords must have shape [N, 3] (batch, y, x), got {tuple(coords.shape)}")
        if feats.dim() != 2 or feats.shape[0] != coords.shape[0]:
            raise ValueError(
                f"feats must have shape [N, C] with N = coords.shape[0] = {coords.shape[0]}, "
                f"got {tuple(feats.shape)}"
            )
        if not feats.is_floating_point():
            raise TypeError(f"feats must be a floating-point tensor, got {feats.dtype}")
        if coords.device != feats.device:
            raise ValueError(
                f"coords and feats must be on one device, got {coords.device} and {feats.device}"
            )
        coords = coords.long()
        if check:
            self._check_coords(coords, spatial_shape, batch_size)
        self.coords = coords
        self.feats = feats
        self.spatial_shape = spatial_shape
        self.batch_size = batch_size
        self._kernel_maps: dict[tuple[int, int], KernelMap] = {} if kernel_maps is None else kernel_maps

    @classmethod
    def _check_coords(cls, coords: torch.Tensor, spatial_shape: tuple[int, int], batch_size: int) -> None:
        cls._check_range(coords, spatial_shape, batch_size)
        keys = coords_to_keys(coords, spatial_shape)
        if coords.shape[0] > 1 and not bool((keys[1:] > keys[:-1]).all()):
            raise ValueError(
                "coords must be sorted by (batch, y, x) and unique; use SparseTensor.from_coords(...) "
                "to sort and deduplicate arbitrary coordinates"
            )

    @staticmethod
    def _check_range(coords: torch.Tensor, spatial_shape: tuple[int, int], batch_size: int) -> None:
        if coords.shape[0] == 0:
            return
        low = coords.min(dim=0).values.tolist()
        high = coords.max(dim=0).values.tolist()
        for axis, name, size in (
            (0, "batch", batch_size),
            (1, "y", spatial_shape[0]),
            (2, "x", spatial_shape[1]),
        ):
            if low[axis] < 0 or high[axis] >= size:
                raise ValueError(
                    f"coords {name} indices must lie in [0, {size}), got range [{low[axis]}, {high[axis]}]"
                )

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def from_dense(cls, x: torch.Tensor) -> SparseTensor:
        """The sites of ``x`` (``[B, C, H, W]``) where any channel is nonzero, in canonical order."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"x must have shape [B, C, H, W], got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        batch, _, height, width = x.shape
        if height < 1 or width < 1:
            raise ValueError(f"x must have a non-empty spatial shape, got {tuple(x.shape[2:])}")
        active = (x != 0).any(dim=1)  # [B, H, W]
        coords = active.nonzero()  # row-major order of (b, y, x) is the canonical order
        feats = x.permute(0, 2, 3, 1)[coords[:, 0], coords[:, 1], coords[:, 2]]
        return cls(coords, feats, (height, width), batch, check=False)

    @classmethod
    def from_coords(
        cls, coords: torch.Tensor, feats: torch.Tensor, spatial_shape: tuple[int, int], batch_size: int
    ) -> SparseTensor:
        """Sort arbitrary coordinates into canonical order; duplicate sites have their features summed."""
        spatial_shape = _check_shape_pair("spatial_shape", spatial_shape)
        unchecked = cls(coords, feats, spatial_shape, batch_size, check=False)
        cls._check_range(unchecked.coords, spatial_shape, batch_size)
        keys = coords_to_keys(unchecked.coords, spatial_shape)
        unique_keys, inverse = torch.unique(keys, sorted=True, return_inverse=True)
        summed = feats.new_zeros((unique_keys.shape[0], feats.shape[1])).index_add_(0, inverse, feats)
        height, width = spatial_shape
        canonical = torch.stack(
            (unique_keys // (height * width), (unique_keys // width) % height, unique_keys % width), dim=1
        )
        return cls(canonical, summed, spatial_shape, batch_size, check=False)

    def replace_feats(self, feats: torch.Tensor) -> SparseTensor:
        """Same sites (and the same kernel-map cache), new features ``[N, C']``."""
        if not isinstance(feats, torch.Tensor):
            raise TypeError(f"feats must be a torch.Tensor, got {type(feats).__name__}")
        if feats.dim() != 2 or feats.shape[0] != self.num_sites:
            raise ValueError(
                f"feats must have shape [N, C] with N = {self.num_sites} active sites, "
                f"got {tuple(feats.shape)}"
            )
        if not feats.is_floating_point():
            raise TypeError(f"feats must be a floating-point tensor, got {feats.dtype}")
        if feats.device != self.coords.device:
            raise ValueError(
                f"feats must be on the coordinates' device {self.coords.device}, got {feats.device}"
            )
        return SparseTensor(
            self.coords,
            feats,
            self.spatial_shape,
            self.batch_size,
            check=False,
            kernel_maps=self._kernel_maps,
        )

    # --- views ----------------------------------------------------------------------------------

    @property
    def num_sites(self) -> int:
        return self.coords.shape[0]

    @property
    def num_channels(self) -> int:
        return self.feats.shape[1]

    @property
    def device(self) -> torch.device:
        return self.feats.device

    @property
    def dtype(self) -> torch.dtype:
        return self.feats.dtype

    @property
    def density(self) -> float:
        """Fraction of the ``B * H * W`` sites that are active."""
        total = self.batch_size * self.spatial_shape[0] * self.spatial_shape[1]
        return self.num_sites / total if total else 0.0

    def to_dense(self) -> torch.Tensor:
        """``[B, C, H, W]`` with zeros at the inactive sites (differentiable in ``feats``)."""
        height, width = self.spatial_shape
        dense = self.feats.new_zeros((self.batch_size, height, width, self.num_channels))
        dense = dense.index_put((self.coords[:, 0], self.coords[:, 1], self.coords[:, 2]), self.feats)
        return dense.permute(0, 3, 1, 2).contiguous()

    def to(self, *args, **kwargs) -> SparseTensor:
        """``feats.to(...)``; coordinates follow to the new device."""
        feats = self.feats.to(*args, **kwargs)
        if feats.device == self.coords.device:
            return self.replace_feats(feats)
        return SparseTensor(
            self.coords.to(feats.device), feats, self.spatial_shape, self.batch_size, check=False
        )

    def kernel_map(self, kernel_size: int = 3, dilation: int = 1) -> KernelMap:
        """The submanifold kernel map of these coordinates, built once and cached."""
        check_kernel_size(kernel_size, dilation)
        key = (kernel_size, dilation)
        cached = self._kernel_maps.get(key)
        if cached is None:
            cached = build_kernel_map(
                self.coords, self.spatial_shape, kernel_size, dilation, batch_size=self.batch_size
            )
            self._kernel_maps[key] = cached
        return cached

    def __repr__(self) -> str:
        return (
            f"SparseTensor(num_sites={self.num_sites}, channels={self.num_channels}, "
            f"spatial_shape={self.spatial_shape}, batch_size={self.batch_size}, dtype={self.dtype}, "
            f"device={self.device})"
        )

    # --- WarpConvNet interop (optional dependency) ------------------------------------------------

    def to_warpconvnet(self):
        """This tensor as a WarpConvNet ``Voxels`` (2-D integer coordinates, ragged-batch offsets).

        Needs ``warpconvnet`` (CUDA only). Written against WarpConvNet's documented
        ``Voxels(batched_coordinates, batched_features, offsets=...)`` constructor; not exercised
        by the test suite, which runs without it.
        """
        voxels_cls = _import_voxels()
        counts = torch.bincount(self.coords[:, 0], minlength=self.batch_size)
        offsets = torch.zeros(self.batch_size + 1, dtype=torch.int64, device=self.device)
        offsets[1:] = counts.cumsum(0)
        # Canonical order is already grouped by batch item, which is the layout Voxels expects.
        return voxels_cls(
            batched_coordinates=self.coords[:, 1:].int().contiguous(),
            batched_features=self.feats,
            offsets=offsets.cpu(),
        )

    @classmethod
    def from_warpconvnet(cls, voxels, spatial_shape: tuple[int, int]) -> SparseTensor:
        """A WarpConvNet ``Voxels`` with 2-D coordinates in ``[0, H) x [0, W)``, in canonical order."""
        _import_voxels()
        batch_indexed = voxels.batch_indexed_coordinates  # [N, 3]: (batch, y, x)
        if batch_indexed.shape[1] != 3:
            raise ValueError(
                f"voxels must have 2-D coordinates, got {batch_indexed.shape[1] - 1} spatial dimensions"
            )
        return cls.from_coords(batch_indexed.long(), voxels.feature_tensor, spatial_shape, voxels.batch_size)


def _import_voxels():
    try:
        from warpconvnet.geometry.types.voxels import Voxels
    except ImportError as error:
        raise ImportError(
            "WarpConvNet interop needs the optional dependency warpconvnet (pip install "
            "'fastvision[sparse]'; it builds CUDA kernels and needs a CUDA torch)"
        ) from error
    return Voxels
