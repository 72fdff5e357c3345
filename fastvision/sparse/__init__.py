"""2-D sparse feature maps and the kernel maps of submanifold sparse convolution."""

from fastvision.sparse.kernel_map import KernelMap, build_kernel_map, coords_to_keys
from fastvision.sparse.tensor import SparseTensor

__all__ = ["KernelMap", "SparseTensor", "build_kernel_map", "coords_to_keys"]
