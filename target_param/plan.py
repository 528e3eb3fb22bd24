"""The graph planner: which layers convert, in which order, how often they run, and what each solve costs.

Before anything changes, the model is traced with torch.fx (with timm's registered leaf modules and
autowrapped functions when timm is installed; Linear/Conv layers stay leaves). The traced graph is run
once on the reference batch and compared with eager. If tracing fails (dynamic control flow) or the graph
disagrees with eager, the plan falls back to the execution order recorded by hooks, with a
:class:`TraceFallbackWarning` naming the reason.

The graph shows what hooks cannot: a Linear weight read with ``get_attr`` and fed to ``F.linear`` outside
its module (beit/eva ``qkv``, user code). Such a *functional* use is rewritten, in the reference pass only,
into a call of the module (plus the external bias, if any), so that its input A is seen.

:func:`explain` returns the plan without changing the model; it prints as a table.
"""
from __future__ import annotations

import math
import operator
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.utils._pytree import tree_leaves

from .errors import FunctionalWeightUseError, ReferenceBatchError, TargetSpaceError, TraceFallbackWarning
from .layers import SUPPORTED, adapter_for
from .solver import uses_dual

__all__ = ["Plan", "PlannedLayer", "make_plan", "display_name", "lam_ratio", "too_large", "LAMBDA_SCALE_THRESHOLD"]

# LambdaScaleWarning above this λ_j / mean diagonal of A_j A_jᵀ (see convert.to_target_space, README)
LAMBDA_SCALE_THRESHOLD = 0.1


def too_large(ratio: float | None) -> bool:
    """Whether λ_j / mean diagonal exceeds LAMBDA_SCALE_THRESHOLD (not by rounding: relative mode's ratio is
    lam itself)."""
    return ratio is not None and ratio > LAMBDA_SCALE_THRESHOLD * (1 + 1e-9)


def lam_ratio(lam: float, diagonal: float) -> float:
    """λ_j / mean diagonal of the Gram (see ``PlannedLayer.mean_diagonals``); NaN for an input that is zero
    on the reference batch (its weights do not change its sums, whatever λ: nothing to warn about)."""
    return lam / diagonal if diagonal > 0.0 else math.nan

_LINEAR_FUNCTIONS = (F.linear, torch._C._nn.linear)


def display_name(name: str, module: nn.Module) -> str:
    return name or type(module).__name__


@dataclass
class PlannedLayer:
    """One selected layer as the reference pass sees it."""

    name: str
    module: nn.Module
    calls: int = 0  # calls on the reference batch (hooks; functional uses are calls in the rewritten graph)
    order: int = -1  # position of the first call in execution order
    functional: list = field(default_factory=list)  # fx nodes that use its weight outside the module
    hidden_in: str | None = None  # the fx leaf block that contains it, if any
    sums: dict | None = None  # S_j on the reference batch (weight space), by target name
    max_positions: int | None = None  # the approximate option: columns a conv layer is solved on
    # per target name: (|column|² of A over its input rows, (columns, groups); rows of A with the ones row),
    # see Adapter.column_energy
    energy: dict | None = None
    bias: bool = False  # whether A has the ones row
    lams: dict | None = None  # per target name: the λ_j its solve uses (set by the conversion's checks)

    def mean_diagonals(self, positions: Tensor | None = None) -> dict[str, float]:
        """Per solve (target name): the mean diagonal of the Gram ``A_j A_jᵀ`` on the reference batch over
        the layer's input rows, ``Σ |A_j|² / (groups · d_in)``: the ones row of the bias is left out (its
        diagonal entry, the number of columns, would dominate the mean exactly when the inputs are small and
        hide the collapse), and a grouped conv counts all its groups. With the approximate option, on the
        columns ``positions``; without them (``explain``) its expectation over a random subset of
        ``max_positions`` columns. 0 for an input that is zero on the reference batch."""
        out = {}
        for name, (e, rows) in self.energy.items():
            cols, groups = e.shape
            total = float(e[positions].double().sum() if positions is not None else e.double().sum())
            if positions is None and self.max_positions is not None \
                    and isinstance(self.module, nn.modules.conv._ConvNd) and cols > self.max_positions:
                total = total * self.max_positions / cols
            out[name] = total / (groups * max(rows - self.bias, 1))
        return out

    @property
    def kind(self) -> str:
        return type(self.module).__name__

    def stats(self) -> dict:
        """Solve shape and an operation count per training step (eq. 6 plus the reference forward)."""
        problems = adapter_for(self.module).problems(self.sums)
        if self.max_positions is not None and isinstance(self.module, nn.modules.conv._ConvNd):
            problems = [(r, min(c, self.max_positions), g, o) for r, c, g, o in problems]
        flops = 0.0
        for rows, cols, g, out_g in problems:
            if uses_dual(rows, cols):  # XXᵀ, Cholesky, solve, Xᵀ Z, S = W A
                f = 2 * cols * cols * rows + cols ** 3 / 3 + 2 * cols * cols * out_g + 4 * cols * rows * out_g
            else:  # XᵀX, XᵀY, Cholesky, solve, S = W A
                f = 2 * cols * rows * rows + 4 * cols * rows * out_g + rows ** 3 / 3 + 2 * rows * rows * out_g
            flops += g * f
        rows, cols, g, _ = max(problems)
        first = next(iter(self.sums.values()))
        shape = tuple(first.shape)
        if isinstance(self.module, nn.modules.conv._ConvNd) and cols < first.numel() // shape[1]:
            shape = (cols, shape[1])  # the approximate option: a target at the chosen columns only
        diagonals = self.mean_diagonals() if self.energy is not None else {}
        ratios = [lam_ratio(self.lams[n], d) for n, d in diagonals.items() if self.lams and n in self.lams]
        ratios = [r for r in ratios if not math.isnan(r)]
        return dict(
            rows=rows, cols=cols, groups=g, dual=uses_dual(rows, cols),
            mean_diagonal=min(diagonals.values()) if diagonals else None,
            lam_ratio=max(ratios) if ratios else None,  # the largest λ_j / mean diagonal over its solves
            full_rank=all(c >= r for r, c, _, _ in problems),
            target_shape=shape, target_size=sum(t.numel() for t in self.sums.values()) if shape == tuple(
                first.shape) else math.prod(shape),
            weight_size=sum(p.numel() for p in self.module.parameters(recurse=False)),
            mflops=3 * flops / 1e6,  # forward + backward ≈ 3 × forward
        )


@dataclass
class Plan:
    """Layers to convert, in execution order, with how the reference pass reaches them."""

    layers: list[PlannedLayer]
    traced: bool
    fallback_reason: str | None = None
    graph_module: fx.GraphModule | None = None  # the traced (and rewritten) graph, run by the reference pass
    options: dict = field(default_factory=dict)

    def __str__(self) -> str:
        head = ("layer", "kind", "d_in(+1)", "columns", "solve", "rank", "λ/diag", "target shape", "targets",
                "MFLOP/step")
        rows = []
        t_total = w_total = 0
        for pl in self.layers:
            s = pl.stats()
            t_total += s["target_size"]
            w_total += s["weight_size"]
            rows.append((
                pl.name + (" (functional)" if pl.functional else "") + (f" [in {pl.hidden_in}]" if pl.hidden_in else ""),
                pl.kind + (f"/g{s['groups']}" if s["groups"] > 1 else ""),
                str(s["rows"]), str(s["cols"]), "dual" if s["dual"] else "primal",
                "full" if s["full_rank"] else "DEFICIENT",
                "-" if s["lam_ratio"] is None else f"{s['lam_ratio']:.2g}"
                + ("!" if too_large(s["lam_ratio"]) else ""),
                "×".join(map(str, s["target_shape"])), f"{s['target_size']:,}", f"{s['mflops']:.1f}",
            ))
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        fmt = "  ".join("{:<%d}" % w for w in widths)
        lines = [fmt.format(*head).rstrip(), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*r).rstrip() for r in rows]
        how = "torch.fx" if self.traced else f"hooks (fx fallback: {self.fallback_reason})"
        lines.append(f"{len(self.layers)} layers, planned with {how}; target parameters {t_total:,} vs "
                     f"weight parameters {w_total:,} ({t_total / max(w_total, 1):.2f}×)")
        deficient = [pl.name for pl in self.layers if not pl.stats()["full_rank"]]
        if deficient:
            lines.append(f"rank-deficient (n̄ × positions < d_in + 1; raise n̄ to fix): {', '.join(deficient)}")
        large = [pl.name for pl in self.layers if too_large(pl.stats()["lam_ratio"])]
        if large:
            lines.append(f"λ > {LAMBDA_SCALE_THRESHOLD:g} × mean diagonal of AAᵀ (!: the ridge shrinks the "
                         f"weights; lower lam or use lam_mode='relative'): {', '.join(large)}")
        return "\n".join(lines)

    __repr__ = __str__


# ------------------------------------------------------------------------------------------ tracing
class _Tracer(fx.Tracer):
    def __init__(self, leaves: tuple):
        try:
            from timm.layers import get_notrace_functions, get_notrace_modules

            leaves = leaves + tuple(get_notrace_modules())
            autowrap = tuple(f for f in get_notrace_functions() if callable(f))
        except ImportError:
            autowrap = ()
        super().__init__(autowrap_functions=autowrap)
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> fx.GraphModule:
    tracer = _Tracer(SUPPORTED)
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__ + "Reference")


def _rewrite_functional(gm: fx.GraphModule, planned: dict[str, PlannedLayer]) -> bool:
    """Find ``get_attr`` uses of converted weights and rewrite each ``F.linear`` use into a module call."""
    rewritten = False
    for node in list(gm.graph.nodes):
        if node.op != "get_attr":
            continue
        owner, _, attr = node.target.rpartition(".")
        if owner not in planned or attr not in ("weight", "bias"):
            continue
        pl = planned[owner]
        for user in list(node.users):
            if attr == "bias" and user.op == "call_function" and user.target in _LINEAR_FUNCTIONS:
                continue  # handled with its weight
            if attr == "weight" and user.op == "call_function" and user.target in _LINEAR_FUNCTIONS \
                    and isinstance(pl.module, nn.Linear) and user.args[1] is node:
                bias = user.args[2] if len(user.args) > 2 else user.kwargs.get("bias")
                own_bias = isinstance(bias, fx.Node) and bias.op == "get_attr" and bias.target == f"{owner}.bias"
                if pl.module.bias is not None and not own_bias:
                    raise FunctionalWeightUseError(
                        f"Layer '{pl.name}': its weight is used by {user.target.__name__} without its own bias, "
                        "while the layer has one; the solve cannot tell which bias the sums include.",
                        "Exclude it with filter_fn, or create the layer with bias=False.",
                        layer=pl.name, node=user.format_node(),
                    )
                pl.functional.append(user.format_node())
                gm.add_submodule(owner, pl.module)  # the graph held only a stub owning `weight`
                with gm.graph.inserting_before(user):
                    call = gm.graph.call_module(owner, (user.args[0],))
                    new = call if own_bias or bias is None else gm.graph.call_function(operator.add, (call, bias))
                user.replace_all_uses_with(new)
                gm.graph.erase_node(user)
                rewritten = True
            else:
                raise FunctionalWeightUseError(
                    f"Layer '{pl.name}': its {attr} is read outside the module's forward by "
                    f"'{user.format_node()}'; only F.linear uses of a Linear weight can be solved.",
                    "Exclude it with filter_fn=lambda module, name: name != '%s'." % owner,
                    layer=pl.name,
                )
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return rewritten


def _hidden(gm: fx.GraphModule, planned: dict[str, PlannedLayer]) -> None:
    """Mark layers that sit inside a non-Linear/Conv leaf module of the graph."""
    leaves = [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target not in planned]
    for name, pl in planned.items():
        for leaf in leaves:
            if name.startswith(leaf + "."):
                pl.hidden_in = leaf


# ------------------------------------------------------------------------------------------ recording
def _run(module: nn.Module, inputs: tuple, planned: list[PlannedLayer] | None, rng: tuple, devices):
    """Run ``module`` on the reference batch from RNG state ``rng`` (the caller's RNG is left as it was),
    recording calls/outputs of ``planned``."""
    from .realise import frozen_running_stats

    handles, counter = [], iter(range(1 << 30))
    for pl in planned or ():

        adapter = adapter_for(pl.module)

        def hook(mod, args, out, pl=pl, adapter=adapter):
            pl.calls += 1
            pl.order = next(counter) if pl.order < 0 else pl.order
            pl.sums = {k: v.detach().clone() for k, v in adapter.sums(mod, args, out).items()}
            pl.energy, pl.bias = adapter.column_energy(mod, args, out, pl.sums), bool(adapter.has_bias)

        handles.append(pl.module.register_forward_hook(hook))
    buffers = [(b, b._version, b.clone()) for b in module.buffers()]
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), frozen_running_stats(module):
            torch.set_rng_state(rng[0])
            for d, state in zip(devices, rng[1]):
                torch.cuda.set_rng_state(state, d)
            return module(*inputs)
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for b, version, saved in buffers:
                if b._version != version:
                    b.copy_(saved)


def _same(a, b) -> bool:
    la, lb = tree_leaves(a), tree_leaves(b)
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if isinstance(x, Tensor) != isinstance(y, Tensor):
            return False
        if isinstance(x, Tensor):
            if x.shape != y.shape:
                return False
            if x.is_floating_point():
                if not torch.allclose(x.float(), y.float(), rtol=1e-4, atol=1e-5 * (1 + x.abs().max().item())):
                    return False
            elif not torch.equal(x, y):
                return False
    return True


def make_plan(model: nn.Module, inputs: tuple, chosen: list[tuple[str, nn.Module]], trace: bool = True) -> Plan:
    """Trace, record one reference pass, and list the selected layers in execution order.

    Never changes the model: hooks are removed, running statistics and other buffers are restored.
    """
    planned = {name: PlannedLayer(display_name(name, m), m) for name, m in chosen}
    devices = sorted({x.device.index or 0 for x in inputs if isinstance(x, Tensor) and x.is_cuda})
    rng = (torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices])  # same dropout in every run
    gm, reason = None, None
    if isinstance(model, SUPPORTED):
        trace, reason = False, "the model is a single layer"
    if trace:
        try:
            gm = _trace(model)
        except TargetSpaceError:
            raise
        except Exception as e:  # dynamic control flow and friends
            reason = f"torch.fx could not trace the model ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    elif reason is None:
        reason = "tracing disabled"
    rewritten = False
    if gm is not None:
        rewritten = _rewrite_functional(gm, planned)
        _hidden(gm, planned)
    try:
        eager = _run(model, inputs, None if gm is not None else planned.values(), rng, devices)
    except TargetSpaceError:
        raise
    except Exception as e:
        raise ReferenceBatchError(
            "The model's forward raised on the reference batch.",
            "Pass a reference batch that model(*ref_batch) accepts (a tensor, or a tuple of positional inputs).",
            error=f"{type(e).__name__}: {e}",
        ) from e
    if gm is not None:
        try:
            traced_out = _run(gm, inputs, planned.values(), rng, devices)
            if not _same(eager, traced_out):
                reason = "the traced graph's output differs from eager on the reference batch"
        except TargetSpaceError:
            raise
        except Exception as e:
            reason = f"the traced graph failed on the reference batch ({type(e).__name__}: {e})"
        if reason is not None:
            if rewritten:
                raise FunctionalWeightUseError(
                    "Some converted weights are used functionally, and only a faithful torch.fx graph can "
                    "solve them.",
                    "Exclude those layers with filter_fn.",
                    reason=reason,
                    layers=[pl.name for pl in planned.values() if pl.functional],
                )
            for pl in planned.values():
                pl.calls, pl.order, pl.sums, pl.functional, pl.hidden_in, pl.energy = 0, -1, None, [], None, None
            _run(model, inputs, planned.values(), rng, devices)
            gm = None
    if reason is not None and trace:
        warnings.warn(f"Planning falls back to the execution order recorded by hooks: {reason}.",
                      TraceFallbackWarning, stacklevel=3)
    order = sorted(planned.values(), key=lambda pl: (pl.order < 0, pl.order))
    return Plan(order, traced=reason is None, fallback_reason=reason, graph_module=gm if reason is None else None)
