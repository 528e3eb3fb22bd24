"""Normalisation layers during a pass on the reference batch: their running statistics stay untouched."""
from __future__ import annotations

import contextlib

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

__all__ = ["frozen_running_stats"]


@contextlib.contextmanager
def frozen_running_stats(root: nn.Module, modules: list | None = None):
    """Normalisation layers keep their running statistics untouched (batch statistics in train mode).
    ``modules``: ``list(root.modules())`` if the caller has it already."""
    changed = [m for m in (root.modules() if modules is None else modules)
               if isinstance(m, _NormBase) and m.training and m.track_running_stats]
    for m in changed:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in changed:
            m.track_running_stats = True

