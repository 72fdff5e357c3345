"""Builds ``fastvision._C`` from csrc/: the C++ sources always, the CUDA sources too when torch is a
CUDA build and nvcc is found. The architecture list defaults to the visible GPUs, or to 9.0 (H100/H200)
when none is visible; ``TORCH_CUDA_ARCH_LIST`` overrides it."""

import glob
import os
import platform
import shutil
import sys

from setuptools import find_namespace_packages, setup

# Namespace packages too: fastvision/benchmark has no __init__.py, and a plain find_packages() leaves it
# out of the wheel (the CLI imports it).
PACKAGES = [
    p for p in find_namespace_packages(include=["fastvision", "fastvision.*"]) if "__pycache__" not in p
] + ["fastvision.triton_kernels"]
PACKAGE_DIR = {"fastvision.triton_kernels": "triton_kernels"}


def _find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [os.path.join(cuda_home, "bin", "nvcc")] if cuda_home else []
    candidates.append("/usr/local/cuda/bin/nvcc")
    for path in candidates:
        if os.path.exists(path):
            return path
    return shutil.which("nvcc")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as handle:
            flag_lines = [line for line in handle if line.startswith("flags")]
    except OSError:
        return set()
    return set(flag_lines[0].split(":", 1)[1].split()) if flag_lines else set()


def _openmp_flags() -> list[str]:
    """``-fopenmp`` when torch's ATen runs its parallel regions on OpenMP (the Linux wheels).

    ``at::parallel_for`` is a header template whose parallel region is an ``omp parallel`` pragma:
    compiled without ``-fopenmp`` it runs the whole range on the calling thread. Only the compile
    needs the flag: the OpenMP calls resolve to the runtime torch has already loaded (no second
    runtime is linked in)."""
    import torch

    info = torch.__config__.parallel_info()
    if "parallel backend: OpenMP" not in info or sys.platform == "darwin":
        return []
    return ["-fopenmp"]


def _cpu_vector_flags() -> list[str]:
    """Compiler flags for ATen's vector types in the CPU kernels, for the CPU this builds on.

    The extension is built from source on the machine that runs it, so it may use what that CPU has:
    AVX-512 (16-wide float) or AVX2+FMA (8-wide). FASTVISION_CPU_BASELINE=avx512|avx2|generic overrides
    the detection (generic: portable scalar fallback of the same code).
    """
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    baseline = os.environ.get("FASTVISION_CPU_BASELINE", "auto")
    flags = _cpu_flags()
    if baseline == "auto":
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
            baseline = "avx512"
        elif {"avx2", "fma"} <= flags:
            baseline = "avx2"
        else:
            baseline = "generic"
    if baseline == "avx512":
        return ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"]  # fmt: skip
    if baseline == "avx2":
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return []


def _extensions():
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    here = os.path.dirname(os.path.abspath(__file__))
    cpp_sources = sorted(
        glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp"))
    )
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    # The headers: listed so that an sdist carries them (setuptools packs an extension's depends).
    headers = sorted(
        glob.glob(os.path.join("csrc", "**", "*.h"), recursive=True)
        + glob.glob(os.path.join("csrc", "**", "*.cuh"), recursive=True)
    )
    nvcc = _find_nvcc()
    build_cuda = (
        os.environ.get("FASTVISION_SKIP_CUDA", "0") != "1"
        and torch.version.cuda is not None
        and nvcc is not None
        and bool(cuda_sources)
    )
    cxx_flags = ["-O3"]  # torch adds the C++ standard it was built with
    cxx_flags += _cpu_vector_flags() + _openmp_flags()
    include_dirs = [os.path.join(here, "csrc")]
    if build_cuda:
        # torch guesses CUDA_HOME from the nvcc on PATH, which may be a wrapper script; pin the real one.
        os.environ["CUDA_HOME"] = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
        ext = CUDAExtension(
            "fastvision._C",
            cpp_sources + cuda_sources,
            include_dirs=include_dirs,
            depends=headers,
            define_macros=[("FASTVISION_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        )
    else:
        ext = CppExtension(
            "fastvision._C",
            cpp_sources,
            include_dirs=include_dirs,
            depends=headers,
            extra_compile_args={"cxx": cxx_flags},
        )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


if os.environ.get("FASTVISION_NO_EXTENSION", "0") == "1":
    setup(packages=PACKAGES, package_dir=PACKAGE_DIR)
else:
    ext_modules, cmdclass = _extensions()
    setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)
