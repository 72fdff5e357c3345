#!/usr/bin/env bash
# Compile one .cu file to an object (no link) with the flags the extension build uses, to check it
# without rebuilding everything: tools/check_cuda_compile.sh csrc/cuda/geglu.cu
set -euo pipefail
cd "$(dirname "$0")/.."
src="$1"
python - "$src" <<'PY'
import os, subprocess, sys, sysconfig
from torch.utils import cpp_extension
src = sys.argv[1]
includes = cpp_extension.include_paths(device_type="cuda") + ["csrc", sysconfig.get_paths()["include"]]
cmd = ["/usr/local/cuda/bin/nvcc", "-c", src, "-o", f"/tmp/{os.path.basename(src)}.{os.getpid()}.o",
       "-std=c++20", "-O3", "--expt-relaxed-constexpr", "-gencode=arch=compute_90,code=sm_90",
       "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
       "-D__CUDA_NO_HALF2_OPERATORS__", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
       "--compiler-options", "-fPIC", "-DFASTVISION_WITH_CUDA"] + [f"-I{p}" for p in includes]
print(" ".join(cmd[:4]), "...")
sys.exit(subprocess.call(cmd))
PY
echo "compiled $src"
