"""The architectures, registered by name (``create_model``, ``list_models``)."""

from fastvision.models import digit_seq_transformer, vit_mnist  # noqa: F401  (registers them)
from fastvision.models.registry import ModelSpec, create_model, get_model_spec, list_models, register_model

__all__ = ["ModelSpec", "create_model", "get_model_spec", "list_models", "register_model"]
