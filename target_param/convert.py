"""The public verbs: ``to_target_space``, ``to_weight_space``, ``is_target_space``, ``realisations``.

Conversion is transactional. Everything that can fail (argument checks, a recording reference pass, the
rank checks) happens before the model is touched; the registration itself is undone on any error, so
the model's parameters, buffers, classes and hooks are exactly as before the call.
"""
from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .errors import (
    AlreadyConvertedError,
    InvalidArgumentError,
    LambdaScaleWarning,
    LayerReusedError,
    NoEligibleLayerError,
    RankDeficientWarning,
    WeightSpaceWarning,
    ReferenceBatchError,
    ShardError,
    UnsupportedLayerError,
    excluding,
)
from .checkpoints import ReferenceSizeCheck
from .distributed import ANCHOR, LAYOUTS, Shards, anchor_for
from .functional import FunctionalAdapter, bare_candidates, owners, register_units
from .adapters import adapter_for, is_candidate
from .layers import ConvAdapter
from .recurrent import RNNAdapter
from .solver import solve_dtype
from .parametrization import TargetParametrization, install, register_target
from .plan import LAMBDA_SCALE_THRESHOLD, Plan, PlannedLayer, lam_ratio, make_plan, too_large
from .realise import ConvertedLayer, Realiser, reused_error
from .registry import REALISER_ATTR, converted_realisers, realisers

__all__ = ["to_target_space", "to_weight_space", "is_target_space", "explain", "realisations", "realisers"]

INITS = ("project", "random")
CASCADES = ("sequential", "optimistic")
LAM_MODES = ("absolute", "relative")
LAM_BUFFER = "lam"  # lam_mode="relative": λ_j, a 0-dim buffer of each target's parametrization
REFERENCE_BUFFER = "target_space_reference"


# ------------------------------------------------------------------------------------------ queries
def is_target_space(model: nn.Module) -> bool:
    """Whether ``model`` or any of its submodules has been converted by :func:`to_target_space`.

    Args:
        model: any module.

    Returns:
        True when a target-space parametrization or realisation engine is found.

    Example:
        >>> import torch, target_param as tp
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> tp.is_target_space(tp.to_target_space(net, torch.randn(8, 3)))
        True
        >>> tp.is_target_space(tp.to_weight_space(net))
        False
    """
    return any(
        isinstance(p, TargetParametrization)
        for m in model.modules()
        if parametrize.is_parametrized(m)
        for plist in m.parametrizations.values()
        for p in plist
    ) or bool(realisers(model))


def realisations(model: nn.Module) -> int:
    """How many reference passes (Algorithm 2) have run on ``model`` since conversion.

    Args:
        model: a converted module (0 for a plain one).

    Returns:
        The count, over every converted root in ``model``.

    Example:
        >>> import torch, target_param as tp
        >>> net = tp.to_target_space(torch.nn.Linear(3, 2), torch.randn(8, 3))
        >>> n = tp.realisations(net)
        >>> net(torch.randn(4, 3)).sum().backward()  # a grad-enabled forward realises once
        >>> tp.realisations(net) - n
        1
    """
    return sum(r.realisations for r in realisers(model))


# ------------------------------------------------------------------------------------------ checks
def _check_options(lam, init, cascade, target_std, max_positions, lam_mode="absolute") -> None:
    if not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise InvalidArgumentError(
            "lam must be a finite number ≥ 0: it is the absolute ridge λ of eq. 6, added to the "
            "unnormalised Gram AAᵀ.",
            "The paper uses lam=1e-3 (two-spirals, IMDB) or lam=0.1 (CNNs, bit-stream RNNs).",
            lam=lam,
        )
    if init not in INITS:
        raise InvalidArgumentError(
            f"init must be one of {INITS}.",
            "'project' keeps the model's function (T_j = S_j); 'random' draws targets and projects (eq. 13).",
            init=init,
        )
    if cascade not in CASCADES:
        raise InvalidArgumentError(
            f"cascade must be one of {CASCADES}.",
            "'sequential' is SCU (Algorithm 2); 'optimistic' is OCU (eq. 8).",
            cascade=cascade,
        )
    if not isinstance(lam_mode, str) or lam_mode not in LAM_MODES:
        raise InvalidArgumentError(
            f"lam_mode must be one of {LAM_MODES}.",
            "'absolute' adds lam itself to every layer's Gram AAᵀ (the paper); 'relative' adds "
            "λ_j = lam × the mean diagonal of layer j's Gram on the reference batch, measured at conversion.",
            lam_mode=lam_mode,
        )
    if not isinstance(target_std, (int, float)) or not target_std > 0:
        raise InvalidArgumentError("target_std must be > 0.", None, target_std=target_std)
    if max_positions is not None:
        if isinstance(max_positions, bool) or not isinstance(max_positions, int) or max_positions < 1:
            raise InvalidArgumentError("max_positions must be a positive int, or None (exact).", None,
                                       max_positions=max_positions)
        if cascade != "sequential":
            raise InvalidArgumentError(
                "max_positions needs cascade='sequential': under OCU a layer passes its target on (eq. 8), "
                "and a target on a subset of positions is not a feature map.",
                "Use cascade='sequential', or max_positions=None.",
                max_positions=max_positions, cascade=cascade,
            )


def _as_inputs(ref_batch) -> tuple:
    return tuple(ref_batch) if isinstance(ref_batch, (tuple, list)) else (ref_batch,)


def _check_reference(model: nn.Module, inputs: tuple) -> None:
    tensors = [x for x in inputs if isinstance(x, Tensor)]
    if not tensors:
        raise ReferenceBatchError(
            "ref_batch must be a tensor, or a tuple of positional inputs with at least one tensor.",
            "Pass the fixed reference batch X̄ (section 3.1), e.g. n̄ training inputs.",
            ref_batch=type(inputs[0]).__name__ if inputs else "()",
        )
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    for i, x in enumerate(tensors):
        where = f"ref_batch[{i}]" if len(inputs) > 1 else "ref_batch"
        if x.numel() == 0 or x.dim() == 0 or x.shape[0] == 0:
            raise ReferenceBatchError(
                "The reference batch is empty; it needs n̄ ≥ 1 patterns along dim 0.",
                "Pass n̄ training inputs; n̄ × positions ≥ d_in + 1 avoids rank deficiency (section 3.1).",
                **{f"{where}.shape": tuple(x.shape)},
            )
        if param is not None and x.device != param.device:
            raise ReferenceBatchError(
                "The reference batch must be on the model's device.",
                "Move it with ref_batch.to(device).",
                **{f"{where}.device": x.device, "model device": param.device},
            )
        if x.is_floating_point():
            if param is not None and x.dtype != param.dtype:
                raise ReferenceBatchError(
                    "A floating-point reference batch must have the model's dtype.",
                    "Cast it with ref_batch.to(dtype).",
                    **{f"{where}.dtype": x.dtype, "model dtype": param.dtype},
                )
            if not bool(torch.isfinite(x).all()):
                raise ReferenceBatchError(
                    "The reference batch contains NaN or Inf; the targets would be meaningless.",
                    "Clean or replace those patterns.",
                    **{f"{where} non-finite entries": int((~torch.isfinite(x)).sum())},
                )


FROZEN_REASON = ("frozen (requires_grad=False): a frozen target is not a frozen weight, W = T·A^‡ would move "
                 "with the layers before it, so the layer keeps its weight")


def _select(model: nn.Module, filter_fn: Callable | None, held: dict,
            frozen: dict | None = None) -> list[tuple[str, nn.Module]]:
    """The selected layers; ``held``: ``functional.owners(model)``, to refuse tied weights by identity.
    ``frozen``: where the layers with a frozen weight (``requires_grad=False``) are recorded (name → reason),
    left out."""
    chosen, tied = [], {}
    for name, m in model.named_modules():
        if not is_candidate(m) or (filter_fn is not None and not filter_fn(m, name)):
            continue
        reason = None
        if isinstance(m, (nn.LSTM, nn.GRU, nn.RNNCellBase)):
            raise UnsupportedLayerError(
                f"Layer '{name}' is an {type(m).__name__}: the paper defines target space for plain recurrent "
                "layers only. Supported: nn.Linear, nn.Conv1d/2d/3d and nn.RNN (tanh or relu, any num_layers, "
                "batch_first, bidirectional); a user-written loop over nn.RNNCell is not.",
                "Use nn.RNN, or exclude the layer with filter_fn=lambda module, name: name != '%s'." % name,
                layer=name,
                type=type(m).__name__,
            )
        if parametrize.is_parametrized(m) or not all(
                isinstance(m._parameters.get(n), nn.Parameter) for n in getattr(m, "_flat_weights_names", ["weight"])):
            reason = "its weight is already parametrized or computed (e.g. weight_norm)"
        elif adapter_for(m) is None:
            reason = f"its class {type(m).__module__}.{type(m).__qualname__} changes how the weight is used"
        if reason:
            raise UnsupportedLayerError(
                f"Layer '{name}' cannot be converted: {reason}, so W = T·A^‡ (eq. 6) would not be the "
                "weight it computes with.",
                "Exclude it with filter_fn=lambda module, name: name != '%s' (it then stays in weight space)."
                % name,
                layer=name,
                type=type(m).__name__,
            )
        if frozen is not None and not all(m._parameters[n].requires_grad
                                          for n in getattr(m, "_flat_weights_names", ["weight"])):
            frozen[name] = FROZEN_REASON
            continue
        for attr, p in m._parameters.items():
            where = held.get(id(p), []) if p is not None else []
            if len(where) > 1:
                tied[name] = f"its {attr} is one Parameter with " + ", ".join(
                    f"'{n}.{a}'" if n else f"'{a}'" for n, a, _, _ in where if (n, a) != (name, attr))
                break
        else:
            chosen.append((name, m))
    if tied:
        raise LayerReusedError(
            "Tied or shared weights: " + "; ".join(f"layer '{n}': {why}" for n, why in tied.items())
            + ". Their uses have different inputs, so W = T·A^‡ (eq. 6) is not one solve.",
            f"Exclude them with filter_fn={excluding(tied)} (they then stay in weight space, tied as before).",
            layers=list(tied),
        )
    return chosen


# ------------------------------------------------------------------------------------------ transaction
class _Snapshot:
    """Class and attribute dictionaries of some modules, so that registration can be undone exactly."""

    def __init__(self, modules):
        self.saved = [
            (m, m.__class__, {k: copy.copy(v) if isinstance(v, (dict, set, list)) else v for k, v in vars(m).items()})
            for m in dict.fromkeys(modules)
        ]
        # registration puts each target into the Parameter object the module held (parametrization.register_target)
        self.data = [(p, p.data) for _, _, attrs in self.saved for p in attrs["_parameters"].values() if p is not None]

    def restore(self) -> None:
        for m, cls, attrs in self.saved:
            m.__class__ = cls
            m.__dict__.clear()
            m.__dict__.update(attrs)
        for p, data in self.data:
            p.data = data


def _reference_size(inputs: tuple) -> int | None:
    return next((x.shape[0] for x in inputs if isinstance(x, Tensor) and x.dim()), None)


def _warn_rank(ran: list, nbar: int | None) -> None:
    """One RankDeficientWarning for every layer with fewer reference columns than input rows (section 3.1,
    Fig. 7), with the n̄ each would need and the filter_fn that keeps them all in weight space."""
    short = [(pl, s) for pl, s in ((pl, pl.stats()) for pl in ran) if not s["full_rank"]]
    if not short:
        return
    lines = []
    for pl, s in short:
        need = f"n̄ ≥ {math.ceil(s['rows'] / (s['cols'] / nbar))}" if nbar else "a larger n̄"
        rows = "d_in + 1" if getattr(pl.adapter, "has_bias", True) else "d_in"
        lines.append(f"  {pl.name}: n̄ × positions = {s['cols']} < {rows} = {s['rows']} (would need {need})")
    warnings.warn(
        f"{len(short)} of {len(ran)} layers have a rank-deficient Gram AAᵀ (fewer columns than rows; section "
        "3.1, Fig. 7): not every target is achievable, and a reference pattern can get a target of its own.\n"
        + "\n".join(lines) + "\nWays out: a larger reference batch (n̄) where the n̄ needed is within reach; or "
        f"keep them in weight space with filter_fn={excluding(pl.name for pl, _ in short)}; or accept it "
        "(the ridge gives the least-norm weights; docs/method.md, choosing n̄).",
        RankDeficientWarning,
        stacklevel=3,
    )


def _register(realiser: Realiser, i: int, targets: dict[str, Tensor], positions: Tensor | None = None,
              lams: dict[str, float] | None = None) -> None:
    """Targets become Parameters at ``parametrizations[name].original``; other tensors get placeholders;
    ``positions`` (the approximate option) becomes a buffer of the weight's parametrization, and each λ_j
    of ``lams`` (``lam_mode="relative"``) a 0-dim buffer ``lam`` of its target's parametrization, in the
    target's dtype (at least float32)."""
    layer = realiser.layers[i]
    m = layer.module
    for name in layer.adapter.tensors:
        register_target(m, name, targets.get(name), realiser, i)
    install(m, layer.adapter.tensors, layer.adapter.targets[0])
    if positions is not None:
        m.parametrizations[layer.adapter.targets[0]][0].register_buffer("positions", positions)
    for name, lam in (lams or {}).items():
        t = targets[name]
        m.parametrizations[name][0].register_buffer(LAM_BUFFER, torch.tensor(lam, dtype=solve_dtype(t.dtype),
                                                                            device=t.device))


def _target_names(root: nn.Module, realiser: Realiser) -> list[str]:
    """The qualified names in ``root`` of every target Parameter of ``realiser``."""
    ids = {id(t) for i in range(len(realiser.layers)) for t in realiser.targets(i).values()}
    return [n for n, p in root.named_parameters(remove_duplicate=False) if id(p) in ids]


def _remove_hooks(module: nn.Module, owner) -> None:
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for k in [k for k, h in hooks.items() if getattr(h, "__self__", None) is owner]:
            del hooks[k]
    hooks = module._load_state_dict_pre_hooks  # (torch wraps a hook with its module: _WrappedHook.hook)
    for k in [k for k, h in hooks.items() if getattr(getattr(h, "hook", None), "realiser", None) is owner]:
        del hooks[k]
    for flags, hooks in ((module._forward_hooks_always_called, module._forward_hooks),
                         (module._forward_hooks_with_kwargs, module._forward_hooks),
                         (module._forward_pre_hooks_with_kwargs, module._forward_pre_hooks)):
        for k in [k for k in flags if k not in hooks]:
            del flags[k]


# ------------------------------------------------------------------------------------------ verbs
def _layer_lams(pl: PlannedLayer, lam: float, lam_mode: str, positions=None) -> dict[str, float]:
    """λ_j of each solve of a planned layer, by target name: ``lam`` (absolute), or ``lam`` × the mean
    diagonal of that solve's Gram over its input rows on the reference batch (relative; ``lam`` itself where
    that input is zero)."""
    diagonals = pl.mean_diagonals(positions)
    if lam_mode == "absolute":
        return {n: float(lam) for n in diagonals}
    floors = _precision_floors(pl)
    return {n: max(float(lam) * d if d > 0.0 else float(lam), floors.get(n, 0.0)) for n, d in diagonals.items()}


def _precision_floors(pl: PlannedLayer) -> dict[str, float]:
    """The least relative λ_j that the solve dtype can resolve, by target name: ``columns × eps`` for a layer
    with a bias solved in the dual form (eq. 23), whose Gram ``XXᵀ + 11ᵀ`` holds the ones column at full scale
    in every entry, so that an input part below ``eps`` of it is lost and a smaller λ_j only amplifies
    rounding (measured: timm lcnet_050's SE convs and head at n̄ = 8, outputs × 1e5). Primal solves and
    layers without a bias have no floor: their Grams scale with the input."""
    if not pl.bias:
        return {}
    eps = torch.finfo(solve_dtype(next(iter(pl.sums.values())).dtype)).eps
    problems = pl.problems()
    names = pl.adapter.targets
    out = {}
    for name, (rows, cols, _, _) in zip(names, problems):
        if pl.max_positions is not None and isinstance(pl.adapter, ConvAdapter):
            cols = min(cols, pl.max_positions)
        if pl.dual(rows, cols):
            out[name] = cols * eps
    return out


def _warn_lambda_scale(ran: list[PlannedLayer], lam_mode: str) -> None:
    """One LambdaScaleWarning naming every layer whose λ_j exceeds LAMBDA_SCALE_THRESHOLD × the mean
    diagonal of its Gram, with the values."""
    lines = []
    for pl in ran:
        floors = _precision_floors(pl) if lam_mode == "relative" else {}
        for n, d in pl.mean_diagonals().items():
            ratio = lam_ratio(pl.lams[n], d)
            if too_large(ratio):
                what = pl.name if n == "weight" else f"{pl.name} ({n})"
                floor = " (λ_j at its floor, columns × eps: a dual solve with a bias, whose input is below the " \
                    "precision of its Gram; raise n̄ so that columns ≥ d_in + 1, or exclude the layer)" \
                    if n in floors and pl.lams[n] == floors[n] else ""
                lines.append(f"{what}: lam {pl.lams[n]:.3g}, mean diagonal {d:.3g}, ratio {ratio:.3g}{floor}")
    if lines:
        warnings.warn(
            f"λ exceeds {LAMBDA_SCALE_THRESHOLD:g} × the mean diagonal of the Gram AAᵀ of {len(lines)} layer(s) "
            "on the reference batch (over the input rows: their activations are small for this λ): the ridge "
            "shrinks their weights, and the cascade of solves can collapse (the converted model then no longer "
            "computes what the original did). "
            + ("Use lam_mode='relative' (λ_j = lam × that mean diagonal), or a smaller lam.\n"
               if lam_mode == "absolute" else "With lam_mode='relative' the ratio is lam itself, but at a floor.\n")
            + "\n".join(lines),
            LambdaScaleWarning,
            stacklevel=3,
        )


def _plan(model, ref_batch, lam, init, target_std, cascade, filter_fn, trace, max_positions=None,
          lam_mode="absolute", shards: Shards | None = None) -> tuple[tuple, Plan]:
    """Every check, and the plan; nothing is changed. Sharded, every rank gets the same errors, and the plan's
    statistics are over the whole reference batch (``distributed.Shards``)."""
    _check_options(lam, init, cascade, target_std, max_positions, lam_mode)
    if shards is None:
        inputs, plan = _plan_here(model, ref_batch, filter_fn, trace)
    else:
        if max_positions is not None:
            raise ShardError(
                "max_positions (section 4.2) is not supported with process_group: each rank would solve on its "
                "own random subset of patch columns, not on one subset of the whole reference batch.",
                "Use max_positions=None, or convert without process_group.",
                max_positions=max_positions)
        shards.check(model, _as_inputs(ref_batch), dict(lam=float(lam), init=init, target_std=float(target_std),
                                                          cascade=cascade, lam_mode=lam_mode, trace=trace))
        try:
            inputs, plan = _plan_here(model, ref_batch, filter_fn, trace)
            _shardable(plan)
        except BaseException as e:
            shards.agree(e, "")
            raise
        shards.agree(None, ",".join(pl.name for pl in plan.layers))
        shards.share(plan, next(x for x in inputs if isinstance(x, Tensor)).shape[0])
        if lam == 0:
            short = [pl.name for pl in plan.layers if not pl.stats()["full_rank"]]
            if short:
                raise ShardError(
                    "lam=0 with a sharded reference batch needs every layer's Gram to have full rank: sharded "
                    "solves take the primal form (eq. 7), whose d × d Gram is singular with fewer columns "
                    "than rows.",
                    "Use lam > 0 (the paper: 1e-3 or 0.1), or a larger reference batch.",
                    layers=short)
    for pl in plan.layers:
        pl.max_positions = max_positions
        pl.lams = _layer_lams(pl, lam, lam_mode)
    plan.options = dict(lam=lam, init=init, target_std=target_std, cascade=cascade, max_positions=max_positions,
                        lam_mode=lam_mode)
    return inputs, plan


def _shardable(plan: Plan) -> None:
    """Refuse, by name, the layers a sharded conversion cannot solve from shards."""
    rnn = [pl.name for pl in plan.layers if isinstance(pl.adapter, RNNAdapter)]
    if rnn:
        raise ShardError(
            "nn.RNN layers are not supported with process_group: Algorithm 5 solves each time step's weights "
            "from the whole sequence batch, and its sharded sums are not implemented.",
            "Exclude them with filter_fn (they then stay in weight space, replicated), or convert without "
            "process_group.",
            layers=rnn)


def _plan_here(model, ref_batch, filter_fn, trace) -> tuple[tuple, Plan]:
    """The checks and the planning pass on this process's reference batch."""
    if is_target_space(model):
        raise AlreadyConvertedError(
            "The model is already in target space (it or one of its submodules was converted).",
            "Call tp.to_weight_space(model) first to convert it again.",
            model=type(model).__name__,
        )
    inputs = _as_inputs(ref_batch)
    _check_reference(model, inputs)
    held = owners(model)
    frozen: dict = {}
    chosen = _select(model, filter_fn, held, frozen)
    bare = bare_candidates(model, chosen, filter_fn, held)
    if not chosen and not bare:
        raise NoEligibleLayerError(
            "No layer to convert: target space needs at least one nn.Linear or nn.Conv1d/2d/3d"
            + (" selected by filter_fn." if filter_fn is not None else "."),
            "Pass a model with such layers, or relax filter_fn.",
            model=type(model).__name__,
        )
    plan = make_plan(model, inputs, chosen, trace=trace, bare=bare)
    plan.skipped = {**frozen, **plan.skipped}
    if not plan.layers:
        raise NoEligibleLayerError(
            "No layer to convert: no nn.Linear / nn.Conv1d/2d/3d / nn.RNN was selected, and no bare Parameter "
            "is used as the weight of F.linear / F.conv*" + (" among those filter_fn selects." if filter_fn else "."),
            "Pass a model with such layers, or relax filter_fn.",
            model=type(model).__name__,
        )
    if plan.skipped:
        warnings.warn("These linear maps stay in weight space (tp.explain lists them too):\n"
                      + "\n".join(f"{n}: {why}" for n, why in plan.skipped.items()), WeightSpaceWarning, stacklevel=3)
    reused = {pl.name: pl.calls for pl in plan.layers if pl.calls > 1}
    if reused:
        raise reused_error(reused)
    unused = [pl.name for pl in plan.layers if pl.calls == 0]
    if unused:
        warnings.warn(f"Layers not run on the reference batch stay in weight space: {unused}", WeightSpaceWarning,
                      stacklevel=3)
    ran = [pl for pl in plan.layers if pl.calls]
    if not ran:
        raise NoEligibleLayerError(
            "None of the selected layers ran on the reference batch.",
            "Check that model(*ref_batch) reaches the Linear/Conv layers.",
            selected=[pl.name for pl in plan.layers],
        )
    plan.layers = ran
    return inputs, plan


def explain(
    model: nn.Module,
    ref_batch,
    *,
    lam: float = 1e-3,
    init: str = "project",
    target_std: float = 1.0,
    cascade: str = "sequential",
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    trace: bool = True,
    max_positions: int | None = None,
    lam_mode: str = "absolute",
) -> Plan:
    """The conversion plan of ``to_target_space`` with the same arguments, without changing ``model``.

    Prints as a table: per layer the kind, d_in (+1 for the bias), columns (n̄ × positions), primal or dual
    solve (eq. 23), whether the Gram can have full rank, λ_j over the mean diagonal of the layer's Gram
    ``A_j A_jᵀ`` over its input rows (``λ/diag``: the largest over an nn.RNN's solves; ``!`` above
    ``LAMBDA_SCALE_THRESHOLD`` = 0.1, where ``to_target_space`` warns), the target's shape and size and an
    estimated cost per step; then target against weight parameter totals. Use it to choose n̄ and λ.

    Args:
        model, ref_batch, and the keyword arguments: as for :func:`to_target_space`.

    Returns:
        A :class:`~target_param.plan.Plan`: ``plan.layers`` in execution order; ``print(plan)`` shows the table.

    Example:
        >>> import torch, target_param as tp
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> plan = tp.explain(net, torch.randn(8, 3))
        >>> [(pl.name, pl.stats()["rows"], pl.stats()["cols"]) for pl in plan.layers]
        [('0', 4, 8), ('2', 5, 8)]
        >>> tp.is_target_space(net)
        False
    """
    return _plan(model, ref_batch, lam, init, target_std, cascade, filter_fn, trace, max_positions, lam_mode)[1]


def to_target_space(
    model: nn.Module,
    ref_batch,
    *,
    lam: float = 1e-3,
    init: str = "project",
    target_std: float = 1.0,
    cascade: str = "sequential",
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    trace: bool = True,
    max_positions: int | None = None,
    lam_mode: str = "absolute",
    process_group=None,
) -> nn.Module:
    r"""Convert ``model`` in place to target space and return it.

    Every selected ``nn.Linear`` / ``nn.Conv{1,2,3}d`` / ``nn.ConvTranspose{1,2,3}d`` (and ``nn.RNN``,
    Algorithm 5: see :mod:`target_param.recurrent`) gets a learnable target ``T_j`` shaped like its output
    on ``ref_batch`` (at ``layer.parametrizations.weight.original``); its weight and bias become
    ``W[0:j] = T_j A[0:j)^‡``, ``A^‡ = Aᵀ(AAᵀ + λI)⁻¹`` (eq. 6-7), with ``A[0:j)`` the layer's input on the
    reference batch as it arrives in the forward pass (Algorithm 2, SCU). A weight the forward uses through
    ``F.linear`` / ``F.conv*`` outside its module, and a bare Parameter used as the weight of one such call
    per forward (``nn.MultiheadAttention``'s projections; row blocks of it as separate solves), is solved
    from the input of that call (see :mod:`target_param.functional`). The training loop is unchanged:
    the optimiser now trains the targets and autograd gives exactly Algorithm 3.

    Args:
        model: any module; converted in place.
        ref_batch: the fixed reference batch X̄ (section 3.1): a tensor, or a tuple of positional inputs
            such that ``model(*ref_batch)`` runs. It is stored on the model as a buffer.
        lam: λ ≥ 0. With ``lam_mode="absolute"`` (the default, the paper's) λ itself is added to every
            layer's unnormalised Gram ``A_j A_jᵀ``, the bias row included.
        init: ``"project"`` sets ``T_j = S_j`` (the model keeps its function, exactly as λ → 0 at full
            rank); ``"random"`` draws a truncated normal with std ``target_std`` and projects once (eq. 13).
        target_std: σ of the random targets (paper: 1 for dense/recurrent nets, 0.1 for CNNs).
        cascade: ``"sequential"`` (SCU, Algorithm 2) or ``"optimistic"`` (OCU, eq. 8).
        filter_fn: ``filter_fn(module, qualified_name) -> bool`` selects layers; default all eligible. A
            bare Parameter is offered as ``(owner module, "owner.attribute")``.
        trace: plan with torch.fx (see :mod:`target_param.plan`); ``False`` uses hooks only.
        max_positions: the approximate option of section 4.2 ("only use a subset of patches when forming
            the pseudoinverse"), off (``None``) by default. A conv layer with more than ``max_positions``
            patch columns (n̄ × output positions) is solved on a fixed random subset of that many
            columns, drawn with torch's default generator and kept as the buffer
            ``parametrizations.weight[0].positions``; its target then exists at those columns only, shape
            (max_positions, C_out), and the layer still computes its whole output. Linear and recurrent
            layers stay exact.
        lam_mode: ``"absolute"`` (default) or ``"relative"``: a scale-free λ. Each solve gets its own
            ``λ_j = lam × m_j``, with ``m_j`` the mean diagonal of its Gram ``A_j A_jᵀ`` over the input rows
            (``Σ|A_j|² / d_in``; the ones row of the bias left out, as its entry, the number of columns,
            would dominate exactly when the inputs are small; over all groups of a grouped conv; on the
            chosen columns with ``max_positions``) on the input it receives in the planning pass (the
            original weights), measured once here and then fixed; ``lam`` itself where that input is zero;
            at least ``columns × eps`` for a layer with a bias solved in the dual form (see
            ``_precision_floors``). An ``nn.RNN`` has one λ_j per layer and direction (one per solve: its
            layers' inputs differ in scale). λ_j is the 0-dim buffer
            ``parametrizations.<target>.0.lam`` (``weight``; ``weight_ih_l{k}[_reverse]`` for nn.RNN) in
            the state_dict, so a checkpoint restores it and loading another value takes effect.

        process_group: a ``torch.distributed`` process group (e.g. ``dist.group.WORLD``): ``ref_batch`` is then
            this rank's shard of the reference batch (the shards concatenate along dim 0 in rank order and may
            be uneven), and this rank's targets are the rows of its shard. Every solve sums its Gram and
            right-hand side over the group, so every rank realises the weights of one process holding the
            whole reference batch, and each rank's targets get the gradient of the mean loss over the ranks
            (see :mod:`target_param.distributed`). Conversion and every forward are then collective (call
            them on every rank); DistributedDataParallel leaves the targets and the reference shard alone
            (they are listed in the root's ``_ddp_params_and_buffers_to_ignore``). ``None``: the whole
            reference batch on this process (under DDP, replicated on every rank).

    Raises:
        ShardError: with ``process_group``, on every rank alike, before anything changes: ranks that disagree
            (options, weights, the shape of their shards), an empty shard, a rank that does not join within
            ``distributed.CHECK_TIMEOUT``, ``max_positions``, an ``nn.RNN`` layer, or ``lam=0`` with a
            layer of fewer columns than rows.

    Warns:
        LambdaScaleWarning: naming every layer whose λ_j exceeds ``LAMBDA_SCALE_THRESHOLD`` = 0.1 of the
            mean diagonal of its Gram over the input rows (with λ_j, the mean diagonal and their ratio). The
            paper's settings in ``examples/`` stay below 4e-3 (measured: two-spirals ≤ 7.4e-5, the Table 1
            CNN ≤ 3.2e-3, the bit-stream RNNs ≤ 5.0e-4); models whose activations are tiny (timm lcnet_050,
            tinynet_e, efficientvit_m0, torchvision mobilenet_v2 in eval mode at fresh BatchNorm statistics,
            λ = 1e-4, n̄ = 8 at 64×64) exceed it in 20-91 of their layers, with ratios up to 7e5-1e13.
        RankDeficientWarning: naming every layer with fewer reference columns than rows.

    Returns:
        ``model``.

    Example:
        >>> import torch, target_param as tp
        >>> torch.manual_seed(0) and None
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()
        >>> x = torch.randn(64, 3, dtype=torch.float64)
        >>> before = net(x)
        >>> _ = tp.to_target_space(net, x, lam=1e-10)   # init="project": T_j = S_j
        >>> sorted(k for k in net.state_dict() if k.endswith("original"))
        ['0.parametrizations.weight.original', '2.parametrizations.weight.original']
        >>> torch.allclose(net(x), before, atol=1e-8)   # the same function on the reference batch
        True
    """
    shards = Shards(process_group) if process_group is not None else None
    inputs, plan = _plan(model, ref_batch, lam, init, target_std, cascade, filter_fn, trace, max_positions,
                         lam_mode, shards)
    ran = [pl for pl in plan.layers if pl.calls]
    _warn_lambda_scale(ran, lam_mode)
    _warn_rank(ran, _reference_size(inputs))
    layers = [ConvertedLayer(pl.name, pl.module, pl.adapter) for pl in ran]

    snapshot = _Snapshot([model] + [layer.module for layer in layers])
    try:
        names = [None if not isinstance(x, Tensor) else REFERENCE_BUFFER + (f"_{k}" if len(inputs) > 1 else "")
                 for k, x in enumerate(inputs)]
        for n in names:
            if n is not None and hasattr(model, n):
                raise AlreadyConvertedError(f"The model already has an attribute '{n}'.", None, attribute=n)
        realiser = Realiser(model, layers, lam, cascade, [(n, None if n else x) for n, x in zip(names, inputs)],
                            plan.graph_module, lam_mode, plan.uses_mode, shards)
        for n, x in zip(names, inputs):
            if n is not None:
                model.register_buffer(n, x.detach().clone())
                realiser.remember_equal(n, x)  # a forward on the user's own X̄ is the reference pass, unread
        unit_targets, unit_lams = {}, {}
        for k, pl in enumerate(ran):
            sums, positions, adapter = pl.sums, None, layers[k].adapter
            if max_positions is not None and isinstance(adapter, ConvAdapter):
                positions = adapter.choose_positions(sums["weight"], max_positions)
                if positions is not None:
                    sums = {"weight": adapter.at_positions(sums["weight"], positions)}
            lams = None
            if lam_mode == "relative":  # on the columns the layer is solved on
                lams = pl.lams if positions is None else _layer_lams(pl, lam, lam_mode, positions)
            targets = sums if init == "project" else {
                n: nn.init.trunc_normal_(torch.empty_like(s), std=target_std, a=-2 * target_std, b=2 * target_std)
                for n, s in sums.items()}
            if isinstance(adapter, FunctionalAdapter):
                unit_targets[k], unit_lams[k] = targets, lams
            else:
                _register(realiser, k, {n: adapter.target_layout(t) for n, t in targets.items()}, positions, lams)
        register_units(realiser, unit_targets, unit_lams, lambda t: solve_dtype(t.dtype))
        model.__dict__[REALISER_ATTR] = realiser
        if shards is not None:  # sharded, not replicated: DistributedDataParallel must leave them alone
            ignored = _target_names(model, realiser) + [n for n in names if n]
            qualified = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
            model.__dict__[LAYOUTS] = {qualified[id(t)]: pl.layouts[n] for k, pl in enumerate(ran)
                                       for n, t in realiser.targets(k).items()}
            model._ddp_params_and_buffers_to_ignore = ignored
            anchor = anchor_for(model, ignored)
            if anchor is not None:
                model.register_parameter(ANCHOR, anchor)
        # before any user hook on the root; with kwargs, so that a call with keyword arguments is seen as such
        model.register_forward_pre_hook(realiser.root_pre_hook, prepend=True, with_kwargs=True)
        model.register_forward_hook(realiser.root_done_hook, prepend=True, with_kwargs=True)  # returned: first
        model.register_forward_hook(realiser.root_post_hook, always_call=True, with_kwargs=True)
        model.register_load_state_dict_pre_hook(ReferenceSizeCheck(realiser))
        if init == "random":
            realiser.project()
        with torch.no_grad():
            realiser.realise()
    except BaseException:
        snapshot.restore()
        raise
    return model


def to_weight_space(model: nn.Module) -> nn.Module:
    """Realise once, then remove every target-space parametrization, leaving the realised weights.

    Afterwards each layer is of its original class with plain ``weight``/``bias`` parameters, the
    ``state_dict`` keys are those from before conversion and no hook or buffer is left behind.

    Args:
        model: a model converted by :func:`to_target_space` (or containing converted submodules).

    Returns:
        ``model``, in place.

    Raises:
        NotConvertedError: nothing in ``model`` is in target space.

    Example:
        >>> import torch, target_param as tp
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> keys = list(net.state_dict())
        >>> _ = tp.to_target_space(net, torch.randn(8, 3))
        >>> list(tp.to_weight_space(net).state_dict()) == keys
        True
    """
    found = converted_realisers(model, "Convert it with tp.to_target_space(model, ref_batch) first.")
    for r in found:
        with torch.no_grad():
            r.realise()
        r.phase = "frozen"
        done = set()
        for layer in r.layers:
            m, ad = layer.module, layer.adapter
            if (id(m), ad.tensors[0]) in done:  # the stored tensors of several functional units: once
                continue
            requires_grad = m.parametrizations[ad.targets[0]].original.requires_grad
            for name in ad.tensors:
                if (id(m), name) in done:
                    continue
                done.add((id(m), name))
                parametrize.remove_parametrizations(m, name, leave_parametrized=True)
                if name not in ad.targets:
                    m.register_parameter(name, nn.Parameter(m._buffers.pop(name), requires_grad=requires_grad))
                p = m._parameters[name]
                if not p.is_contiguous():  # realised Linear weights are views of Wᵀ
                    p.data = p.data.contiguous()
        root = r.root
        root.__dict__.pop("_ddp_params_and_buffers_to_ignore", None)
        root.__dict__.pop(LAYOUTS, None)
        root._parameters.pop(ANCHOR, None)
        _remove_hooks(root, r)
        for name, _ in r.reference:
            if name is not None:
                delattr(root, name)
        del root.__dict__[REALISER_ATTR]
    return model
