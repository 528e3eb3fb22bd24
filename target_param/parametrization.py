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
from torch.nn.utils import parametrize

from .errors import AssignmentError

__all__ = ["TargetParametrization", "install", "ridge_lams", "register_target"]


class TargetParametrization(nn.Module):
    """Evaluates to the realised tensor ``which`` (e.g. ``"weight"``) of converted layer ``index``."""

    def __init__(self, realiser, index: int, which: str):
        super().__init__()
        self.realiser = realiser  # a plain object shared by every layer of one conversion
        self.index = index
        self.which = which

    def forward(self, original: Tensor) -> Tensor:
        return self.realiser.tensor(self.index, self.which)

    def ridge_lam(self, buffer: str = "lam") -> float | None:
        """λ_j of this target's solve with ``lam_mode="relative"``: the 0-dim buffer ``lam``, as a Python
        float, read from the device only when the buffer changed (another tensor, in-place version or
        storage: ``load_state_dict``, ``.to()``, an assignment), so that a realisation does not synchronise
        for it. None without the buffer (``lam_mode="absolute"``: the realiser's λ)."""
        t = self._buffers.get(buffer)
        if t is None:
            return None
        seen = self.__dict__.setdefault("_lam_seen", {}).get(buffer)
        if seen is None or seen[0] is not t or seen[1] != t._version or seen[2] != t.data_ptr():
            seen = self.__dict__["_lam_seen"][buffer] = (t, t._version, t.data_ptr(), float(t))
        return seen[3]

    def right_inverse(self, value: Tensor) -> Tensor:
        raise AssignmentError(
            "The weights of a target-space layer are computed from its targets (eq. 6); they cannot be "
            "assigned.",
            "Assign the targets at `layer.parametrizations.weight.original`, or call "
            "tp.to_weight_space(model) first.",
            layer=self.realiser.layers[self.index if isinstance(self.index, int) else self.index[0]].name,
        )

    def extra_repr(self) -> str:
        lam = self.ridge_lam()
        if lam is not None:
            return f"{self.which} = T·A^‡ (eq. 6), λ_j={lam:.6g}"
        if getattr(self.realiser, "relative", False):
            return f"{self.which} = T·A^‡ (eq. 6), λ_j of the layer's target"
        return f"{self.which} = T·A^‡ (eq. 6), λ={self.realiser.lam}"


def register_target(module: nn.Module, name: str, target: Tensor | None, realiser, index) -> None:
    """Parametrize ``module.<name>`` by :class:`TargetParametrization`. With a ``target``, it takes the place of
    the tensor in the *same* Parameter object (``.data``), so that an optimiser built before the conversion
    trains the targets; without one, ``original`` is an empty, non-persistent placeholder."""
    old = module._parameters[name]
    if target is not None:
        old.data = target
    else:
        del module._parameters[name]
        module.register_buffer(name, old.new_empty(0))
    parametrize.register_parametrization(module, name, TargetParametrization(realiser, index, name), unsafe=True)
    if target is None:
        module.parametrizations[name]._non_persistent_buffers_set.add("original")  # a placeholder, not state


def ridge_lams(module: nn.Module, names: tuple[str, ...]) -> dict[str, float]:
    """λ_j of each target ``names`` of a converted ``module`` (``lam_mode="relative"``; see
    ``TargetParametrization.ridge_lam``), by target name."""
    lists = module._modules["parametrizations"]._modules
    return {n: lists[n]._modules["0"].ridge_lam() for n in names}


def _deepcopy_with_own_class(self, memo):
    """parametrize gives each parametrized module its own generated class holding the ``weight``
    property. A plain deepcopy would share that class, and removing the parametrization from one copy
    would delete the property from the other; so the replica gets a class of its own."""
    cls = type(self)
    replica = cls.__new__(cls)
    memo[id(self)] = replica
    state = self.__dict__
    if state.get("_flat_weights"):  # nn.RNN's list of the weights last read: realised, carrying a graph
        state = dict(state, _flat_weights=[None if w is None else w.detach() for w in state["_flat_weights"]])
    replica.__dict__ = copy.deepcopy(state, memo)
    own = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    replica.__class__ = type(cls.__name__, cls.__bases__, own)
    return replica


def _fast_read(name: str, fget):
    """The getter of ``layer.<name>``: the realised tensor straight from the realiser, without the two
    module calls of parametrize's own getter (16 µs against 0.3 µs here), which it falls back on when
    ``parametrize.cached()`` is active or another parametrization is chained after ours."""
    def read(self):
        chain = self._modules["parametrizations"]._modules[name]
        if len(chain._modules) != 1 or parametrize._cache_enabled:
            return fget(self)
        p = chain._modules["0"]
        return p.realiser.tensor(p.index, p.which)
    return read


def install(module: nn.Module, names: tuple[str, ...], owner: str, forward: bool = True) -> None:
    """Specialise the class that parametrize generated for this module (one per module): fast reads of the
    realised ``names``; a ``forward`` that does the layer's part of the reference pass (Algorithm 2, see
    ``Realiser.layer_call``) and is the class's own otherwise, so that no hook slows every call; and deep
    copies with a class of their own. ``owner``: the name whose parametrization holds the realiser.
    ``forward=False`` for tensors solved at their functional uses (see functional): the forward stays."""
    cls = type(module)
    base = cls.forward

    def layer_forward(self, *args, **kwargs):
        p = self._modules["parametrizations"]._modules[owner]._modules["0"]
        return p.realiser.layer_call(p.index, base, self, args, kwargs)

    if forward:
        cls.forward = layer_forward
    parametrized, base_setattr = frozenset(names), cls.__setattr__

    def setattr_(self, name, value):
        # nn.Module registers an assigned Parameter itself, past the property: refuse it as a tensor is refused
        if name in parametrized and isinstance(value, nn.Parameter):
            self._modules["parametrizations"]._modules[name]._modules["0"].right_inverse(value)
        base_setattr(self, name, value)
    cls.__setattr__ = setattr_
    for name in names:
        prop = cls.__dict__[name]
        setattr(cls, name, property(_fast_read(name, prop.fget), prop.fset))
    cls.__deepcopy__ = _deepcopy_with_own_class
