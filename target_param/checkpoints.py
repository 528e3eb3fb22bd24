"""Checkpoints in weight space, written while the model trains in target space."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .distributed import ANCHOR
from .errors import ReferenceBatchError
from .registry import converted_realisers

__all__ = ["weight_space_state_dict", "ReferenceSizeCheck"]

_PARAMETRIZATIONS = "parametrizations."


def weight_space_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state_dict of the plain model: every converted tensor realised (``W = T·A^‡``, eq. 6, from the
    current targets) under its original key, every other entry as it is; no target, reference batch or λ
    buffer. The model is not changed (it realises first if anything is stale).

    The weights are those of the model's current mode: in train mode the reference pass runs with dropout
    active (and BatchNorm on batch statistics), so they differ from the ones an eval-mode forward realises.
    Call ``model.eval()`` first for the weights that evaluation uses (``to_weight_space`` does the same).

    It equals ``to_weight_space(copy.deepcopy(model)).state_dict()`` without the copy, and loads into the
    original architecture: ``plain.load_state_dict(...)``, or Hugging Face's
    ``model.save_pretrained(path, state_dict=tp.weight_space_state_dict(model))`` then ``from_pretrained(path)``.

    Args:
        model: a model converted by :func:`~target_param.to_target_space` (or containing converted submodules).

    Returns:
        An ordered dict of detached tensors (the realised ones are new tensors; the others are the model's own,
        as ``state_dict`` returns them).

    Raises:
        NotConvertedError: nothing in ``model`` is in target space.

    Example:
        >>> import torch, target_param as tp
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> keys = list(net.state_dict())
        >>> _ = tp.to_target_space(net, torch.randn(8, 3))
        >>> sorted(tp.weight_space_state_dict(net)) == sorted(keys)
        True
    """
    found = converted_realisers(model, "model.state_dict() is already the weight-space state_dict.")
    converted: dict[int, dict[str, None]] = {}  # id(module) → its converted tensor names, in order
    roots: dict[int, list[str]] = {}
    for r in found:
        roots[id(r.root)] = [name for name, _ in r.reference if name]
        for layer in r.layers:
            converted.setdefault(id(layer.module), {}).update(dict.fromkeys(layer.adapter.tensors))
    prefixes = {}
    for prefix, m in model.named_modules():
        prefixes.setdefault(id(m), prefix + "." if prefix else "")
    dropped = {prefixes[i] + name for i, names in roots.items() for name in names}
    by_prefix = {prefixes[i]: (i, names) for i, names in converted.items()}
    modules = {id(m): m for m in model.modules()}
    out, emitted = {}, set()
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if key in dropped or key.rsplit(".", 1)[-1] == ANCHOR:
                continue
            head, sep, _ = key.partition(_PARAMETRIZATIONS)
            if sep and head in by_prefix and (head == "" or head.endswith(".")):
                if head not in emitted:
                    emitted.add(head)
                    i, names = by_prefix[head]
                    for name in names:
                        out[head + name] = getattr(modules[i], name).detach().clone(memory_format=torch.contiguous_format)
                continue
            out[key] = value
    return out


class ReferenceSizeCheck:
    """A ``load_state_dict`` pre-hook of a converted root: a checkpoint whose reference batch has another shape
    (targets are n̄ × outputs) is refused by name, before torch lists every target's size mismatch."""

    def __init__(self, realiser):
        self.realiser = realiser

    def __call__(self, module, state_dict, prefix, *args):
        for name, _ in self.realiser.reference:
            saved = state_dict.get(prefix + name) if name else None
            here = getattr(module, name) if name else None
            if isinstance(saved, Tensor) and saved.shape != here.shape:
                raise ReferenceBatchError(
                    "The checkpoint was saved by a model converted on a reference batch of another shape; its "
                    "targets (n̄ × the layers' outputs) cannot load into this one.",
                    "Convert the model on a reference batch of the checkpoint's shape (the checkpoint holds it, "
                    f"at '{prefix + name}'), then load: tp.to_target_space(model, state['{prefix + name}']).",
                    buffer=prefix + name, checkpoint=tuple(saved.shape), model=tuple(here.shape),
                )
