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

# Subpackages loaded on first use, so that `import fastvision` stays light.
_LAZY_SUBPACKAGES = ("data", "deploy", "models", "nn", "sparse", "train", "viz")


def __getattr__(name: str):
    if name in _LAZY_SUBPACKAGES:
        import importlib

        return importlib.import_module(f"fastvision.{name}")
    raise AttributeError(f"module 'fastvision' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY_SUBPACKAGES])


__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "__version__",
    "available_backends",
    "data",
    "deploy",
    "forced_backend",
    "models",
    "nn",
    "ops",
    "sparse",
    "train",
    "use_backend",
    "viz",
]
