"""Public functional ops. Each ``<op>`` has ``<op>_reference`` beside it in ``fastvision/ops/<op>.py``."""

from fastvision.ops.geglu import geglu, geglu_reference

__all__ = ["geglu", "geglu_reference"]
