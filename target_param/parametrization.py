"""The ``torch.nn.utils.parametrize`` parametrization of a target-space layer.

``layer.parametrizations.weight.original`` is the target ``T_j``, the only learnable tensor of the layer,
shaped like the layer's output on the reference batch. ``layer.weight`` and ``layer.bias`` evaluate to
``W[0:j] = T_j A[0:j)^‡`` (eq. 6-7), which the shared :class:`~target_param.realise.Realiser` computes for
all layers at once by one reference pass (Algorithm 2). The bias (and, for nn.RNN, ``weight_hh``) is
parametrized too; its ``original`` is an empty, non-persistent placeholder, so no dead tensor is left among
the parameters or in the state_dict.
"""
from __future__ import annotations

import copy

from torch import Tensor, nn

from .errors import AssignmentError

__all__ = ["TargetParametrization", "copy_with_own_class"]


class TargetParametrization(nn.Module):
    """Evaluates to the realised tensor ``which`` (e.g. ``"weight"``) of converted layer ``index``."""

    def __init__(self, realiser, index: int, which: str):
        super().__init__()
        self.realiser = realiser  # a plain object shared by every layer of one conversion
        self.index = index
        self.which = which

    def forward(self, original: Tensor) -> Tensor:
        return self.realiser.tensor(self.index, self.which)

    def right_inverse(self, value: Tensor) -> Tensor:
        raise AssignmentError(
            "The weights of a target-space layer are computed from its targets (eq. 6); they cannot be "
            "assigned.",
            "Assign the targets at `layer.parametrizations.weight.original`, or call "
            "tp.to_weight_space(model) first.",
            layer=self.realiser.layers[self.index].name,
        )

    # Hooks on the layer. They are bound methods of a module of the tree, so copy.deepcopy keeps each
    # model's hooks pointing at its own realiser.
    def pre_hook(self, module: nn.Module, args):
        self.realiser.layer_pre_hook(self.index, args)

    def post_hook(self, module: nn.Module, args, output):
        return self.realiser.layer_post_hook(self.index, args, output)

    def extra_repr(self) -> str:
        return f"{self.which} = T·A^‡ (eq. 6), λ={self.realiser.lam}"


def _deepcopy_with_own_class(self, memo):
    """parametrize gives each parametrized module its own generated class holding the ``weight``
    property. A plain deepcopy would share that class, and removing the parametrization from one copy
    would delete the property from the other; so the replica gets a class of its own."""
    cls = type(self)
    replica = cls.__new__(cls)
    memo[id(self)] = replica
    replica.__dict__ = copy.deepcopy(self.__dict__, memo)
    own = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    replica.__class__ = type(cls.__name__, cls.__bases__, own)
    return replica


def copy_with_own_class(module: nn.Module) -> None:
    """Make deep copies of this parametrized module independent (see ``_deepcopy_with_own_class``)."""
    type(module).__deepcopy__ = _deepcopy_with_own_class
