"""The architectures, registered by name."""

from fastvision.models.registry import ModelSpec, create_model, get_model_spec, list_models, register_model

__all__ = ["ModelSpec", "create_model", "get_model_spec", "list_models", "register_model"]
