"""The architectures, registered by name (``create_model``, ``list_models``)."""

from fastvision.models import (  # noqa: F401  (importing registers each architecture)
    convnext_v2_fcmae,
    detector_fusion,
    digit_seq_transformer,
    mamba_ginr_scent,
    sparse_moe_denoiser,
    sparse_unet_mnist,
    vit_mnist,
)
from fastvision.models.registry import (
    ModelSpec,
    create_model,
    example_inputs,
    get_model_spec,
    inference_module,
    list_models,
    register_model,
)

__all__ = [
    "ModelSpec",
    "create_model",
    "example_inputs",
    "get_model_spec",
    "inference_module",
    "list_models",
    "register_model",
]
