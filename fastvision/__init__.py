"""fastvision: hand-written Triton and CUDA kernels behind drop-in PyTorch modules for vision models."""

from fastvision._backend import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    forced_backend,
    use_backend,
)

__version__ = "0.1.0"

from fastvision import ops  # noqa: E402  (ops import the backend machinery above)

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "__version__",
    "available_backends",
    "forced_backend",
    "ops",
    "use_backend",
]
