"""Where a converted root keeps its realisation engine: the attribute, and the walk that finds every engine
of a model. The bottom of the package: the engine (``realise``), the verbs (``convert``) and sharding
(``distributed``) all find engines through it, without importing one another for it."""
from __future__ import annotations

from torch import nn

from .errors import NotConvertedError

__all__ = ["REALISER_ATTR", "realisers", "converted_realisers"]

REALISER_ATTR = "_target_space_realiser"


def realisers(model: nn.Module) -> list:
    """The realisation engines (:class:`~target_param.realise.Realiser`) of every converted (sub)module of
    ``model``.

    Args:
        model: any module.

    Returns:
        One engine per converted root, in module order (empty for a plain model).

    Example:
        >>> import torch, target_param as tp
        >>> net = tp.to_target_space(torch.nn.Linear(3, 2), torch.randn(8, 3))
        >>> [layer.name for layer in tp.convert.realisers(net)[0].layers]
        ['Linear']
    """
    return [m.__dict__[REALISER_ATTR] for m in model.modules() if REALISER_ATTR in m.__dict__]


def converted_realisers(model: nn.Module, way_out: str) -> list:
    """``realisers(model)``, or a NotConvertedError (with ``way_out``) when nothing in it is in target space."""
    found = realisers(model)
    if not found:
        raise NotConvertedError("The model has nothing in target space.", way_out, model=type(model).__name__)
    return found
