"""Triton kernels, one file per op (installed as ``fastvision.triton_kernels``).

Each file holds the forward and backward kernels of its op and the launch helpers that size the
grid; the public op in ``fastvision.ops`` checks inputs and registers the launches.
"""
