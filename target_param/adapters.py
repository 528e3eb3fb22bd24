"""Which adapter solves a module: the layer classes that can be converted, and the dispatch from a module to
its adapter (``layers`` for Linear/Conv/ConvTranspose and transformers' Conv1D, ``recurrent`` for nn.RNN)."""
from __future__ import annotations

import sys

from torch import nn

from .layers import Adapter, ConvAdapter, ConvTransposeAdapter, LinearAdapter, TransposedLinearAdapter
from .recurrent import RNNAdapter

__all__ = ["adapter_for", "is_candidate", "layer_types", "SUPPORTED", "CANDIDATES"]

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
             nn.RNN)
# Also offered to filter_fn, so that the user hears why they are refused.
CANDIDATES = SUPPORTED + (nn.RNNBase, nn.RNNCellBase)


def _hf_conv1d() -> tuple:
    """transformers' Conv1D class, when transformers is imported (a model cannot hold one otherwise)."""
    cls = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return (cls,) if isinstance(cls, type) else ()


def layer_types() -> tuple:
    """The layer classes solved as a whole (fx leaves): ``SUPPORTED`` and transformers' Conv1D."""
    return SUPPORTED + _hf_conv1d()


def _plain(module: nn.Module) -> bool:
    """True when the module computes with its weight exactly as its torch base class does."""
    if type(module) in (nn.LSTM, nn.GRU) or isinstance(module, nn.RNNCellBase):
        return False
    for base in _hf_conv1d():
        if isinstance(module, base):
            return type(module).forward is base.forward
    for base in SUPPORTED:
        if isinstance(module, base):
            cls = type(module)
            same_forward = cls.forward is base.forward or _is_plain_linear_forward(cls)
            same_conv = not hasattr(base, "_conv_forward") or cls._conv_forward is base._conv_forward
            return same_forward and same_conv
    return False


def _is_plain_linear_forward(cls) -> bool:
    # timm.layers.Linear re-implements Linear.forward as F.linear(x, weight, bias) (for torchscript).
    return cls.__module__.startswith("timm.layers") and cls.__name__ == "Linear"


def is_candidate(module: nn.Module) -> bool:
    """Linear/Conv/recurrent modules (subclasses included) that a user may want converted."""
    return isinstance(module, CANDIDATES + _hf_conv1d())


def adapter_for(module: nn.Module) -> Adapter | None:
    """The adapter of a convertible layer, or None when its class changes how the weight is used."""
    if not _plain(module):
        return None
    if isinstance(module, _hf_conv1d()):
        return TransposedLinearAdapter(module)
    if isinstance(module, nn.Linear):
        return LinearAdapter(module)
    if isinstance(module, nn.RNN):
        return RNNAdapter(module)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return ConvTransposeAdapter(module)
    return ConvAdapter(module)
