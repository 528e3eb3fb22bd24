"""Functional weight uses: weights that a forward computes with through ``F.linear`` / ``F.conv*`` instead of
calling their module, each solved from the input of that use (eq. 6).

Two kinds of tensor are solved this way:

* the weight of a converted Linear/Conv layer that another forward reads: ``nn.MultiheadAttention``'s
  ``out_proj`` (read by ``F.multi_head_attention_forward``), torchvision's ``shifted_window_attention``, timm
  attention blocks;
* a *bare* Parameter, owned by a module that is not a Linear/Conv layer, used as the weight of F.linear /
  F.conv*: ``nn.MultiheadAttention``'s ``in_proj_weight`` with ``in_proj_bias``, or its ``q/k/v_proj_weight``.
  Row blocks of it may be used separately (cross-attention: the query rows on the target sequence, the
  key/value rows on the memory); each block is one solve, a *unit*, with its own target: the output of its use.

Targets and state_dict keys. A unit's target is the output of its use on the reference batch (less an
external bias, if the use adds one that is not a converted tensor). The first unit of a stored weight
(in row order) keeps it at ``<owner>.parametrizations.<weight>.original``, the k-th at ``...original<k>``;
a converted bias is an empty placeholder, as for Linear. For self-attention: ``self_attn.parametrizations.
in_proj_weight.original`` (L, n̄, 3E), as ``F.multi_head_attention_forward`` lays out its input; for
cross-attention (key is value): ``...original`` (L, n̄, E) on the query and ``...original1`` (S, n̄, 2E) on the
memory. ``to_weight_space`` restores the original keys.

The mechanism is a :class:`torch.overrides.TorchFunctionMode`:

* at conversion, :class:`Recorder` watches every candidate tensor through one pass on the reference batch:
  each F.linear/F.conv* receiving one (or a row block of one: ``split``, ``chunk``, ``narrow``, slicing) is a
  use, recorded with its input, bias and output; reads that do not compute (``.shape``, ``.dtype``, the
  fast-path checks of ``nn.TransformerEncoderLayer``) are not uses; any other op computing with one makes it
  ineligible (a converted layer's weight: ``FunctionalWeightUseError`` naming the op);
* in every reference pass, :class:`ReferenceUses` hands out a *placeholder* for a tensor read before its
  units are solved, follows its row blocks, and solves each unit at its F.linear/F.conv* call from the input
  it receives there (``Realiser.functional_call``), which returns ``S_j`` (SCU) or ``T_j`` (OCU). An active
  mode also turns off PyTorch's fused attention fast paths during the pass (they check
  ``has_torch_function``); outside the pass they read the realised weights.

Python-level torch functions that receive a watched tensor (``F.multi_head_attention_forward``,
``Tensor.split``) are run with the mode still active but without their own ``__torch_function__`` dispatch
(:func:`_undispatched`), so that the calls inside them are seen. Models without functional uses never enter
the mode; with them, every torch call of a reference pass goes through it (a few µs each).
"""
from __future__ import annotations

import functools
import itertools
import types
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from torch.nn.utils import parametrize

from .errors import FunctionalWeightUseError
from .adapters import adapter_for, is_candidate
from .layers import Adapter
from .parametrization import install, register_target

__all__ = ["FunctionalAdapter", "Recorder", "ReferenceUses", "LINEAR", "CONVS", "op_name", "owners",
           "bare_candidates", "register_units", "stored_groups"]

LINEAR = torch._C._nn.linear  # F.linear
CONVS = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}  # F.conv1d/2d/3d
_CONV_MODULES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = (None, None, None, 1, 0, 1, 1)
_CHECKS = ("has_torch_function", "has_torch_function_unary", "has_torch_function_variadic")


def op_name(func) -> str:
    if func is LINEAR:
        return "F.linear"
    if func in CONVS:
        return f"F.conv{CONVS[func]}d"
    if type(func).__name__ == "method-wrapper" and type(func.__self__).__name__ == "getset_descriptor":
        return f"Tensor.{func.__self__.__name__}"  # a property: Tensor.T, Tensor.mT, ...
    owner = getattr(func, "__objclass__", None) or getattr(func, "__self__", None)
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    if owner is not None and "." not in name and isinstance(owner, type):
        name = f"{owner.__name__}.{name}"
    # torch's C functions and Tensor methods, as a user writes them
    return name.replace("_VariableFunctionsClass.", "torch.").replace("TensorBase.", "Tensor.")


def _never(*args) -> bool:
    return False


@functools.lru_cache(maxsize=None)
def _undispatched(func):
    """A Python-level torch function without its own ``__torch_function__`` dispatch: the same code with
    ``has_torch_function*`` false for its own arguments only (the functions it calls keep theirs), so that
    a mode that re-enters itself sees the calls inside it. None for C functions and other Python functions."""
    if not isinstance(func, types.FunctionType) or not set(_CHECKS) & set(func.__code__.co_names):
        return None
    scope = dict(func.__globals__)
    scope.update({n: _never for n in _CHECKS})
    plain = types.FunctionType(func.__code__, scope, func.__name__, func.__defaults__, func.__closure__)
    plain.__kwdefaults__ = func.__kwdefaults__
    return plain


def _call_args(func, args: tuple, kwargs: dict) -> dict:
    """The named arguments of an F.linear / F.conv* call."""
    if func is LINEAR:
        names, defaults = ("input", "weight", "bias"), (None, None, None)
    else:
        names, defaults = _CONV_ARGS, _CONV_DEFAULTS
    out = dict(zip(names, defaults))
    out.update(zip(names, args))
    out.update(kwargs)
    return out


def shadow_layer(func, weight: Tensor, call: dict) -> nn.Module:
    """A meta-device Linear/Conv describing one use (its weight shape, bias, stride, padding, ...): the
    adapter of the use is the layer adapter of this module."""
    has_bias = call["bias"] is not None
    if func is LINEAR:
        return nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta")
    groups = call["groups"]
    return _CONV_MODULES[CONVS[func]](
        weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), call["stride"], call["padding"],
        call["dilation"], groups, bias=has_bias, device="meta")


# ------------------------------------------------------------------------------------------ the adapter
class FunctionalAdapter(Adapter):
    """One unit: rows ``rows`` of the owner's tensor ``weight`` (and of ``bias``, if the use's bias is a
    converted tensor), solved as the Linear/Conv layer ``shadow`` from the input of its use.

    ``external``: the use adds a bias that is not converted (e.g. beit's ``cat(q_bias, 0, v_bias)``); the
    target is then the use's output less that bias, and the use returns ``S_j`` plus it."""

    def __init__(self, weight: str, bias: str | None, rows: tuple[int, int], full: int, shadow: nn.Module,
                 external: bool = False, slot: int = 0, bias_rows: tuple[int, int] | None = None,
                 bias_full: int | None = None):
        self.weight, self.bias, self.rows, self.full, self.external = weight, bias, rows, full, external
        # the rows of the stored bias this unit solves (a stacked bias may serve several weights: q/k/v_proj)
        self.bias_rows, self.bias_full = bias_rows or rows, bias_full or full
        self.shadow = shadow
        self.inner = adapter_for(shadow)
        self.kind = "F." + type(shadow).__name__.lower()
        self.tensors = (weight, bias) if bias else (weight,)
        self.targets = (weight,)
        self.slot = slot  # the k of ``original<k>`` (0: ``original``), set at registration

    @property
    def blocked(self) -> bool:
        return self.rows != (0, self.full)

    @property
    def original(self) -> str:
        return "original" + (str(self.slot) if self.slot else "")

    @property
    def lam_buffer(self) -> str:
        return "lam" + (str(self.slot) if self.slot else "")

    def target_tensors(self, module: nn.Module) -> dict[str, Tensor]:
        return {self.weight: module.parametrizations[self.weight]._parameters[self.original]}

    def lams(self, module: nn.Module) -> dict[str, float | None]:
        p = module.parametrizations[self.weight][0]
        return {self.weight: p.ridge_lam(self.lam_buffer)}

    def _rename(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {self.weight: tensors["weight"]}
        if self.bias:
            out[self.bias] = tensors["bias"]
        return out

    def sums(self, module, args, output):
        return {self.weight: output}

    def realise(self, module, args, targets, solves, name, optimistic):
        wb, out = self.inner.realise(self.shadow, args, {"weight": targets[self.weight]}, solves, name, optimistic)
        return self._rename(wb), out

    def optimistic(self, module, output, targets):
        return targets[self.weight].clone()

    def problems(self, sums):
        return self.inner.problems({"weight": sums[self.weight]})

    def column_energy(self, module, args, output, sums):
        return {self.weight: self.inner.column_energy(self.shadow, args, output, {"weight": sums[self.weight]})["weight"]}

    def stored_shape(self, which: str) -> tuple:
        """The shape of the whole stored tensor ``which`` (all its row blocks)."""
        return (self.full, *self.shadow.weight.shape[1:]) if which == self.weight else (self.bias_full,)

    def rows_of(self, which: str) -> tuple[int, int]:
        return self.rows if which == self.weight else self.bias_rows

    def weight_size(self) -> int:
        return self.shadow.weight.numel() + (self.shadow.bias.numel() if self.bias else 0)


# ------------------------------------------------------------------------------------------ the mode
class _Uses(TorchFunctionMode):
    """Dispatch shared by the recording and the solving mode: F.linear/F.conv* calls on a watched tensor
    (``use``), row blocks of one, reads, and any other computation (``computes``)."""

    def lookup(self, t: Tensor):
        """``(key, r0, r1)`` of a watched tensor, or of rows r0:r1 of one; None otherwise."""
        raise NotImplementedError

    def use(self, func, call: dict, weight, bias, args, kwargs):
        raise NotImplementedError

    def computes(self, func, hits: list) -> None:
        raise NotImplementedError

    def read(self, func, hits: list) -> None:
        pass

    def derive(self, t: Tensor, hit: tuple) -> None:
        raise NotImplementedError

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        hits = [(t, h) for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)
                for h in (self.lookup(t),) if h is not None]
        if not hits:
            return func(*args, **kwargs)
        if func is LINEAR or func in CONVS:
            call = _call_args(func, args, kwargs)
            w, b = call["weight"], call["bias"]
            weight = self.lookup(w) if isinstance(w, Tensor) else None
            if weight is not None and all(t is w or t is b for t, _ in hits):
                return self.use(func, call, weight, self.lookup(b) if isinstance(b, Tensor) else None, args,
                                kwargs)
        plain = _undispatched(func)
        if plain is not None:
            with self:
                return plain(*args, **kwargs)
        out = func(*args, **kwargs)
        produced = [t for t in tree_leaves(out) if isinstance(t, Tensor)]
        if not produced:
            self.read(func, hits)
            return out
        blocks = _row_blocks(func, args, kwargs, hits, produced)
        if blocks is None:
            self.computes(func, hits)
        else:
            for t, hit in zip(produced, blocks):
                self.derive(t, hit)
        return out


def _row_blocks(func, args, kwargs, hits, produced) -> list | None:
    """When ``func`` only selects whole rows of one watched tensor (split, chunk, narrow, slicing along dim
    0, contiguous), the ``(key, r0, r1)`` of each tensor it produced; else None. Found by running ``func`` on
    a probe holding each row's index in place of the watched tensor."""
    if len({id(t) for t, _ in hits}) != 1:
        return None
    source, (key, r0, r1) = hits[0]
    if source.dim() == 0:
        return None
    probe = torch.arange(r0, r1, device=source.device).reshape(-1, *[1] * (source.dim() - 1)).expand(source.shape)
    flat, spec = tree_flatten((args, kwargs))
    pargs, pkwargs = tree_unflatten([probe if t is source else t for t in flat], spec)
    try:
        with torch._C.DisableTorchFunction():
            out = func(*pargs, **pkwargs)
    except Exception:
        return None
    probed = [t for t in tree_leaves(out) if isinstance(t, Tensor)]
    if len(probed) != len(produced):
        return None
    blocks = []
    for p in probed:
        if p.dim() != source.dim() or p.shape[1:] != source.shape[1:] or p.shape[0] == 0:
            return None
        rows = p.reshape(p.shape[0], -1).long()
        first = rows[:, 0]
        start = int(first[0])
        if not bool((rows == first[:, None]).all()) or \
                not torch.equal(first, torch.arange(start, start + len(first), device=first.device)):
            return None
        blocks.append((key, start, start + len(first)))
    return blocks


@dataclass
class Use:
    """One F.linear/F.conv* call on a watched weight, as recorded at conversion."""

    func: object
    weight: tuple  # (key, r0, r1)
    bias: tuple | None  # (key, r0, r1) of a watched bias, or None
    external: Tensor | None  # a bias that is not watched
    shadow: nn.Module
    input: Tensor
    output: Tensor  # less the external bias
    order: int
    op: str = ""


@dataclass
class Recorder(_Uses):
    """The recording mode of the planning pass (see the module docstring). ``watched``: id of each candidate
    tensor → ``(key, tensor)``; keys are ``(owner name, attribute)``. ``inside``: owners whose own forward is
    running (their calls are the module's, recorded by hooks)."""

    watched: dict
    counter: itertools.count
    inside: set = field(default_factory=set)
    derived: dict = field(default_factory=dict)
    uses: list = field(default_factory=list)
    others: dict = field(default_factory=dict)  # key → the name of the first op that computes with it
    reads: set = field(default_factory=set)  # keys read (no computation) outside their owner's forward

    def __post_init__(self):
        super().__init__()

    def lookup(self, t):
        hit = self.watched.get(id(t))
        if hit is not None and hit[1] is t:
            hit = (hit[0], 0, t.shape[0] if t.dim() else 1)
        else:
            hit = self.derived.get(id(t))
            hit = hit[0] if hit is not None and hit[1] is t else None
        return None if hit is None or hit[0][0] in self.inside else hit

    def derive(self, t, hit):
        self.derived[id(t)] = (hit, t)

    def read(self, func, hits):
        self.reads.update(h[0] for _, h in hits)

    def computes(self, func, hits):
        for _, (key, _, _) in hits:
            self.others.setdefault(key, op_name(func))

    def use(self, func, call, weight, bias, args, kwargs):
        out = func(*args, **kwargs)
        b = call["bias"]
        external = b.detach() if isinstance(b, Tensor) and bias is None else None
        sums = out.detach() if external is None else (out - _bias_shape(external, out, func)).detach()
        self.uses.append(Use(func, weight, bias, external, shadow_layer(func, call["weight"], call),
                             call["input"].detach(), sums, next(self.counter), op_name(func)))
        return out


def _bias_shape(b: Tensor, out: Tensor, func) -> Tensor:
    """A per-output-channel bias shaped to broadcast against the use's output."""
    return b if func is LINEAR else b.reshape(-1, *[1] * (out.dim() - 2))


class ReferenceUses(_Uses):
    """The solving mode of a reference pass (see the module docstring)."""

    def __init__(self, realiser):
        super().__init__()
        self.realiser = realiser
        self.placeholders: dict[int, tuple] = {}  # id → ((id(owner), attribute), r0, r1)
        self.kept: list[Tensor] = []  # every placeholder and block of this pass (their ids stay unique)
        self.by_key: dict = {}

    def placeholder(self, module: nn.Module, which: str, like: Tensor, shape: tuple) -> Tensor:
        """The stand-in for tensor ``which`` of ``module`` before its units are solved in this pass: its
        shape, dtype and device, without memory."""
        key = (id(module), which)
        t = self.by_key.get(key)
        if t is None:
            t = self.by_key[key] = like.new_zeros(()).expand(shape)
            self.placeholders[id(t)] = (key, 0, shape[0])
            self.kept.append(t)
        return t

    def lookup(self, t):
        return self.placeholders.get(id(t))

    def derive(self, t, hit):
        self.placeholders[id(t)] = hit
        self.kept.append(t)

    def computes(self, func, hits):
        names = sorted({self.realiser.stored_name(h[0]) for _, h in hits})
        raise FunctionalWeightUseError(
            f"During the reference pass, {op_name(func)} computes with the converted tensor(s) {names}; only "
            "F.linear and F.conv1d/2d/3d uses of a converted tensor can be solved (eq. 6), and this op was not "
            "seen at conversion.",
            "Exclude the layer with filter_fn, or keep its forward the same as at conversion.",
            op=op_name(func),
        )

    def use(self, func, call, weight, bias, args, kwargs):
        r = self.realiser
        i = r.units.get(weight)
        if i is None:
            raise FunctionalWeightUseError(
                f"During the reference pass, {op_name(func)} uses rows {weight[1]}:{weight[2]} of the converted "
                f"tensor '{r.stored_name(weight[0])}', which conversion did not see used that way.",
                "Keep the forward the same as at conversion, or exclude the tensor with filter_fn.",
                op=op_name(func),
            )
        ad = r.layers[i].adapter
        b = call["bias"]
        expected = ((weight[0][0], ad.bias), *ad.bias_rows) if ad.bias else None
        if bias != expected \
                or ad.external != (bias is None and b is not None):
            raise FunctionalWeightUseError(
                f"Unit '{r.layers[i].name}': {op_name(func)} passes a different bias than at conversion.",
                "Keep the forward the same as at conversion, or exclude the tensor with filter_fn.",
                layer=r.layers[i].name,
            )
        x = call["input"]
        out = r.functional_call(i, x)
        return out if not ad.external else out + _bias_shape(b, out, func)


# ------------------------------------------------------------------------------------------ conversion
def owners(model: nn.Module) -> dict[int, list[tuple[str, str, Tensor, nn.Module]]]:
    """id of each Parameter → every (module name, attribute, Parameter, module) that holds it, by identity:
    more than one entry is a tied or shared weight."""
    out: dict = {}
    seen = set()
    for name, m in model.named_modules(remove_duplicate=False):
        for attr, p in m._parameters.items():
            if p is not None and (id(m), attr) not in seen:
                seen.add((id(m), attr))
                out.setdefault(id(p), []).append((name, attr, p, m))
    return out


def bare_candidates(model: nn.Module, chosen: list[tuple[str, nn.Module]], filter_fn, held: dict) -> dict:
    """The bare Parameters that may be solved at their uses: floating, not held by a Linear/Conv/recurrent
    module nor by another module (tied), not parametrized, selected by ``filter_fn(owner, qualified name)``,
    trainable (a frozen target is not a frozen weight).
    ``held``: ``owners(model)``. id → (owner name, attribute, Parameter, owner)."""
    out = {}
    for pid, where in held.items():
        name, attr, p, m = where[0]
        if len(where) > 1 or is_candidate(m) or parametrize.is_parametrized(m) or not p.is_floating_point() \
                or p.dim() == 0:
            continue
        qualified = f"{name}.{attr}" if name else attr
        if filter_fn is not None and not filter_fn(m, qualified):
            continue
        if not p.requires_grad:
            continue
        out[pid] = (name, attr, p, m)
    return out


def stored_groups(layers: list) -> dict[tuple, list[int]]:
    """(id(owner), attribute) of each stored tensor of the functional units → the units that solve its rows,
    in row order."""
    groups: dict = {}
    for k, layer in enumerate(layers):
        ad = layer.adapter
        if isinstance(ad, FunctionalAdapter):
            for name in ad.tensors:
                groups.setdefault((id(layer.module), name), []).append(k)
    for (_, name), ks in groups.items():
        ks.sort(key=lambda k: layers[k].adapter.rows_of(name))
    return groups


def register_units(realiser, targets: dict[int, dict[str, Tensor]], lams: dict[int, dict | None], dtype_of) -> None:
    """Register the functional units' parametrizations (see the module docstring for the keys): each stored
    tensor once, evaluating to its realised rows; each unit's target a Parameter; ``lams`` (relative λ) as
    0-dim buffers ``lam<k>``, in ``dtype_of(target)``."""
    layers = realiser.layers
    for (_, name), ks in stored_groups(layers).items():
        m = layers[ks[0]].module
        index = ks[0] if len(ks) == 1 else tuple(ks)
        requires_grad = m._parameters[name].requires_grad
        weight = layers[ks[0]].adapter.weight == name
        register_target(m, name, targets[ks[0]][name] if weight else None, realiser, index)
        plist = m.parametrizations[name]
        if not weight:
            continue
        for slot, k in enumerate(ks):
            ad = layers[k].adapter
            ad.slot = slot
            t = targets[k][name]
            if slot:
                plist.register_parameter(ad.original, nn.Parameter(t, requires_grad=requires_grad))
            if lams.get(k):
                plist[0].register_buffer(ad.lam_buffer, torch.tensor(lams[k][name], dtype=dtype_of(t),
                                                                     device=t.device))
    names: dict = {}
    for layer in layers:
        if isinstance(layer.adapter, FunctionalAdapter):
            names.setdefault(layer.module, {}).update(dict.fromkeys(layer.adapter.tensors))
    for m, stored in names.items():
        install(m, tuple(stored), next(iter(stored)), forward=False)
