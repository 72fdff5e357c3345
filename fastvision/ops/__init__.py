"""Public functional ops. Each ``<op>`` has ``<op>_reference`` beside it in ``fastvision/ops/<op>.py``."""

from fastvision.ops.add_layer_norm import add_layer_norm, add_layer_norm_reference
from fastvision.ops.geglu import geglu, geglu_reference

__all__ = ["add_layer_norm", "add_layer_norm_reference", "geglu", "geglu_reference"]
