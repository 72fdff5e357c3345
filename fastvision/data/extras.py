"""Optional dependencies of the training and visualisation tools (the ``train`` extra).

The core package needs only torch, numpy and triton. The embedded stand-in data (scikit-learn's
digits, scikit-image's photographs), the image-quality metrics (scikit-image) and the figures
(matplotlib, scikit-learn's PCA/t-SNE) import their packages when first used, through
:func:`require`, which turns a missing package into a :class:`MissingExtraError` that says what
needs it and how to install it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRA = "train"
INSTALL_HINT = f"pip install 'fastvision[{EXTRA}]'"
# import name -> distribution name
PACKAGES = {"sklearn": "scikit-learn", "skimage": "scikit-image", "matplotlib": "matplotlib"}


class MissingExtraError(ImportError):
    """An optional package of the ``train`` extra is not installed."""


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (e.g. ``"sklearn.datasets"``) for ``purpose``, or raise ``MissingExtraError``."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        top = module.split(".")[0]
        package = PACKAGES.get(top, top)
        raise MissingExtraError(
            f"{purpose} needs {package}, which is not installed (import {module!r} failed: {error}). "
            f"It is part of the {EXTRA!r} extra: {INSTALL_HINT}",
            name=module,
        ) from error
