"""The graph planner: which layers convert, in which order, how often they run, and what each solve costs.

Before anything changes, the model is traced with torch.fx (with timm's registered leaf modules and
autowrapped functions when timm is installed; Linear/Conv layers stay leaves). The traced graph is run
once on the reference batch and compared with eager. If tracing fails (dynamic control flow) or the graph
disagrees with eager, the plan falls back to the execution order recorded by hooks, with a
:class:`TraceFallbackWarning` naming the reason.

Weights used outside their module's forward (``F.linear(x, layer.weight)``, attention functions, bare
Parameters such as ``nn.MultiheadAttention.in_proj_weight``) are found by the recording mode of
:mod:`target_param.functional` during the same pass, traced or not.

:func:`explain` returns the plan without changing the model; it prints as a table.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx, nn
from torch.utils._pytree import tree_leaves

from .errors import FunctionalWeightUseError, ReferenceBatchError, TargetSpaceError, TraceFallbackWarning
from .functional import FunctionalAdapter, Recorder
from .norms import frozen_running_stats
from .adapters import adapter_for, layer_types
from .layers import ConvAdapter, FeedForwardAdapter, positional
from .solver import uses_dual

__all__ = ["Plan", "PlannedLayer", "make_plan", "display_name", "lam_ratio", "too_large", "LAMBDA_SCALE_THRESHOLD"]

# LambdaScaleWarning above this λ_j / mean diagonal of A_j A_jᵀ (see convert.to_target_space, docs/method.md)
LAMBDA_SCALE_THRESHOLD = 0.1


def too_large(ratio: float | None) -> bool:
    """Whether λ_j / mean diagonal exceeds LAMBDA_SCALE_THRESHOLD (not by rounding: relative mode's ratio is
    lam itself)."""
    return ratio is not None and ratio > LAMBDA_SCALE_THRESHOLD * (1 + 1e-9)


def lam_ratio(lam: float, diagonal: float) -> float:
    """λ_j / mean diagonal of the Gram (see ``PlannedLayer.mean_diagonals``); NaN for an input that is zero
    on the reference batch (its weights do not change its sums, whatever λ: nothing to warn about)."""
    return lam / diagonal if diagonal > 0.0 else math.nan



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
    adapter: object = None  # the layer's adapter; a FunctionalAdapter for a tensor solved at its F.linear/F.conv*
    shared: list | None = None  # sharded (distributed.Shards.share): the problems over every rank's columns
    layouts: dict | None = None  # sharded: per target name, where the rank's reference patterns lie in it

    def __post_init__(self):
        if self.adapter is None:
            self.adapter = adapter_for(self.module)

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
                    and isinstance(self.adapter, ConvAdapter) and cols > self.max_positions:
                total = total * self.max_positions / cols
            out[name] = total / (groups * max(rows - self.bias, 1))
        return out

    @property
    def kind(self) -> str:
        return self.adapter.kind if isinstance(self.adapter, FunctionalAdapter) else type(self.module).__name__

    def problems(self) -> list[tuple[int, int, int, int]]:
        """(rows, columns, groups, outputs per group) of each solve (``Adapter.problems``), over every rank's
        columns when sharded."""
        return self.shared if self.shared is not None else self.adapter.problems(self.sums)

    def dual(self, rows: int, cols: int) -> bool:
        """Whether a solve takes the dual form (eq. 23); sharded solves never do (see ``distributed``)."""
        return self.shared is None and uses_dual(rows, cols)

    def stats(self) -> dict:
        """Solve shape and an operation count per training step (eq. 6 plus the reference forward)."""
        problems = self.problems()
        if self.max_positions is not None and isinstance(self.adapter, ConvAdapter):
            problems = [(r, min(c, self.max_positions), g, o) for r, c, g, o in problems]
        flops = 0.0
        for rows, cols, g, out_g in problems:
            if self.dual(rows, cols):  # XXᵀ, Cholesky, solve, Xᵀ Z, S = W A
                f = 2 * cols * cols * rows + cols ** 3 / 3 + 2 * cols * cols * out_g + 4 * cols * rows * out_g
            else:  # XᵀX, XᵀY, Cholesky, solve, S = W A
                f = 2 * cols * rows * rows + 4 * cols * rows * out_g + rows ** 3 / 3 + 2 * rows * rows * out_g
            flops += g * f
        rows, cols, g, _ = max(problems)
        first = next(iter(self.sums.values()))
        shape = tuple(first.shape)
        if isinstance(self.adapter, ConvAdapter) and cols < first.numel() // shape[1]:
            shape = (cols, shape[1])  # the approximate option: a target at the chosen columns only
        diagonals = self.mean_diagonals() if self.energy is not None else {}
        ratios = [lam_ratio(self.lams[n], d) for n, d in diagonals.items() if self.lams and n in self.lams]
        ratios = [r for r in ratios if not math.isnan(r)]
        return dict(
            rows=rows, cols=cols, groups=g, dual=self.dual(rows, cols),
            mean_diagonal=min(diagonals.values()) if diagonals else None,
            lam_ratio=max(ratios) if ratios else None,  # the largest λ_j / mean diagonal over its solves
            full_rank=all(c >= r for r, c, _, _ in problems),
            target_shape=shape, target_size=sum(t.numel() for t in self.sums.values()) if shape == tuple(
                first.shape) else math.prod(shape),
            weight_size=self.adapter.weight_size() if isinstance(self.adapter, FunctionalAdapter)
            else sum(p.numel() for p in self.module.parameters(recurse=False)),
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
    uses_mode: bool = False  # the reference pass needs functional.ReferenceUses (functional units, or reads)
    skipped: dict = field(default_factory=dict)  # name → why: linear maps left in weight space (frozen, bare uses)

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
        if self.skipped:
            lines.append("left in weight space:")
            lines += [f"  {n}: {why}" for n, why in self.skipped.items()]
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
    tracer = _Tracer(layer_types())
    graph = tracer.trace(model)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__ + "Reference")
    # GraphModule copies each get_attr's tensor onto a stub module; the graph must read the owner itself,
    # whose tensors conversion parametrizes (functional uses of converted tensors, see functional)
    for node in graph.nodes:
        if node.op != "get_attr":
            continue
        owner = node.target.rpartition(".")[0]
        if not owner:  # a tensor of the model itself: read from the model at each call
            read = RootRead(node.target)
            read.__dict__["root"] = model  # not a submodule: the model does not nest in its own graph
            gm.add_submodule(f"target_space_root_{node.target}", read)
            node.op, node.target = "call_module", f"target_space_root_{node.target}"
            continue
        try:
            gm.add_submodule(owner, model.get_submodule(owner))
        except AttributeError:
            pass
    gm.recompile()
    return gm


class RootRead(nn.Module):
    """In a reference graph, a ``get_attr`` of one of the model's own tensors, read from the model at each call
    (a parametrized bare tensor evaluates to its realised value; see ``_trace``)."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self):
        return getattr(self.__dict__["root"], self.name)


def _hidden(gm: fx.GraphModule, planned: dict[str, PlannedLayer]) -> None:
    """Mark layers that sit inside a non-Linear/Conv leaf module of the graph."""
    leaves = [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target not in planned]
    for name, pl in planned.items():
        for leaf in leaves:
            if name.startswith(leaf + "."):
                pl.hidden_in = leaf


# ------------------------------------------------------------------------------------------ recording
def _run(module: nn.Module, inputs: tuple, planned: dict[str, PlannedLayer] | None, rng: tuple, devices,
         bare: dict | None = None):
    """Run ``module`` on the reference batch from RNG state ``rng`` (the caller's RNG is left as it was),
    recording calls/outputs of ``planned`` by hooks, and the functional uses of their tensors and of the
    ``bare`` candidates (id → (owner name, attribute, tensor, owner)) by a ``functional.Recorder``; returns the
    output and the recorder."""
    handles, counter = [], itertools.count()
    watched = {id(t): ((owner, attr), t) for owner, attr, t, _ in (bare or {}).values()}
    recorder = Recorder(watched, counter) if planned is not None else None
    for name, pl in (planned or {}).items():
        adapter = pl.adapter

        def hook(mod, args, kwargs, out, name=name, pl=pl, adapter=adapter):
            recorder.inside.discard(name)
            args = positional(type(mod).forward, mod, args, kwargs)
            pl.calls += 1
            pl.order = next(counter) if pl.order < 0 else pl.order
            pl.sums = {k: v.detach().clone() for k, v in adapter.sums(mod, args, out).items()}
            pl.energy, pl.bias = adapter.column_energy(mod, args, out, pl.sums), bool(adapter.has_bias)

        handles.append(pl.module.register_forward_pre_hook(lambda mod, args, name=name: recorder.inside.add(name)))
        handles.append(pl.module.register_forward_hook(hook, with_kwargs=True))
        for attr, t in pl.module._parameters.items():
            if t is not None:
                watched[id(t)] = ((name, attr), t)
    buffers = [(b, b._version, b.clone()) for b in module.buffers()]
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), frozen_running_stats(module), \
                recorder if recorder is not None else contextlib.nullcontext():
            torch.set_rng_state(rng[0])
            for d, state in zip(devices, rng[1]):
                torch.cuda.set_rng_state(state, d)
            return module(*inputs), recorder
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


def make_plan(model: nn.Module, inputs: tuple, chosen: list[tuple[str, nn.Module]], trace: bool = True,
              bare: dict | None = None) -> Plan:
    """Trace, record one reference pass, and list the selected layers and functional units in execution order.

    ``bare``: candidate bare tensors, id → (owner name, attribute, tensor, owner) (see ``functional``). Never changes
    the model: hooks are removed, running statistics and other buffers are restored.
    """
    planned = {name: PlannedLayer(display_name(name, m), m) for name, m in chosen}
    devices = sorted({x.device.index or 0 for x in inputs if isinstance(x, Tensor) and x.is_cuda})
    rng = (torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices])  # same dropout in every run
    gm, reason = None, None
    if isinstance(model, layer_types()):
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
    if gm is not None:
        _hidden(gm, planned)
    try:
        eager, recorder = _run(model, inputs, None if gm is not None else planned, rng, devices, bare)
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
            traced_out, recorder = _run(gm, inputs, planned, rng, devices, bare)
            if not _same(eager, traced_out):
                reason = "the traced graph's output differs from eager on the reference batch"
        except TargetSpaceError:
            raise
        except Exception as e:
            reason = f"the traced graph failed on the reference batch ({type(e).__name__}: {e})"
        if reason is not None:
            for name, m in chosen:
                planned[name] = PlannedLayer(display_name(name, m), m)
            _, recorder = _run(model, inputs, planned, rng, devices, bare)
            gm = None
    if reason is not None and trace:
        warnings.warn(f"Planning falls back to the execution order recorded by hooks: {reason}.",
                      TraceFallbackWarning, stacklevel=3)
    units, skipped = _functional_layers(recorder, planned, bare or {})
    order = sorted([*planned.values(), *units], key=lambda pl: (pl.order < 0, pl.order))
    uses_mode = bool(units) or any(key[0] in planned for key in recorder.reads) \
        or any(isinstance(pl.adapter, FunctionalAdapter) for pl in planned.values())
    return Plan(order, traced=reason is None, fallback_reason=reason, graph_module=gm if reason is None else None,
                uses_mode=uses_mode, skipped=skipped)


# ------------------------------------------------------------------------------------------ functional uses
def _record_use(pl: PlannedLayer, use, adapter: FunctionalAdapter) -> None:
    pl.adapter = adapter
    pl.calls += 1
    pl.order = use.order if pl.order < 0 else pl.order
    pl.sums = {adapter.weight: use.output}
    pl.energy = adapter.column_energy(pl.module, (use.input,), use.output, pl.sums)
    pl.bias = bool(adapter.bias)
    pl.functional.append(use.op)


def _functional_layers(recorder: Recorder, planned: dict[str, PlannedLayer], bare: dict
                       ) -> tuple[list[PlannedLayer], dict[str, str]]:
    """From the recorded functional uses: update the converted layers whose weight is used functionally,
    raise for those used otherwise, and plan one unit per use of each eligible bare tensor. Returns the units
    and, by name, the bare tensors used by F.linear/F.conv* that stay in weight space, with the reason."""
    by_weight: dict = {}
    for use in recorder.uses:
        by_weight.setdefault(use.weight[0], []).append(use)
    for name, pl in planned.items():
        for attr in ("weight", "bias"):
            op = recorder.others.get((name, attr))
            if op is not None:
                raise FunctionalWeightUseError(
                    f"Layer '{pl.name}': its {attr} is computed with by {op} outside the module's forward; only "
                    "F.linear and F.conv1d/2d/3d uses of a converted weight can be solved (eq. 6).",
                    "Exclude it with filter_fn=lambda module, name: name != '%s'." % name,
                    layer=pl.name, op=op,
                )
        for use in by_weight.pop((name, "weight"), []):
            full = pl.module.weight.shape[0]
            own = (name, "bias") if pl.module._parameters.get("bias") is not None else None
            if not isinstance(pl.adapter, (FeedForwardAdapter, FunctionalAdapter)):
                raise FunctionalWeightUseError(
                    f"Layer '{pl.name}': its weight is used by {use.op} outside the module's forward; only the "
                    "weights of Linear and Conv layers can be solved there.",
                    "Exclude it with filter_fn=lambda module, name: name != '%s'." % name, layer=pl.name)
            if use.weight[1:] != (0, full):
                raise FunctionalWeightUseError(
                    f"Layer '{pl.name}': rows {use.weight[1]}:{use.weight[2]} of its weight are used by {use.op}; "
                    "a layer's weight is solved as a whole.",
                    "Exclude it with filter_fn=lambda module, name: name != '%s'." % name, layer=pl.name)
            if (use.bias[0] if use.bias else None) != own or (use.bias and use.bias[1:] != (0, full)):
                raise FunctionalWeightUseError(
                    f"Layer '{pl.name}': its weight is used by {use.op} without its own bias, while the layer has "
                    "one; the solve cannot tell which bias the sums include." if own else
                    f"Layer '{pl.name}': its weight is used by {use.op} with another layer's bias.",
                    "Exclude it with filter_fn, or create the layer with bias=False.", layer=pl.name)
            _record_use(pl, use, FunctionalAdapter("weight", "bias" if own else None, (0, full), full, use.shadow,
                                                   use.external is not None))
    for use in recorder.uses:
        if use.bias and use.bias[0][0] in planned and use.weight[0][0] != use.bias[0][0]:
            raise FunctionalWeightUseError(
                f"The bias of layer '{planned[use.bias[0][0]].name}' is used by {use.op} with another weight.",
                "Exclude it with filter_fn.", layer=planned[use.bias[0][0]].name)
    units, skipped = [], {}
    for (owner, attr), op in recorder.others.items():  # never an F.linear/F.conv* weight, but a linear map
        t = next((t for o, a, t, _ in bare.values() if (o, a) == (owner, attr)), None)
        if (owner, attr) not in by_weight and t is not None and _multiplies(op, t):
            skipped[f"{owner}.{attr}" if owner else attr] = (
                f"computed with by {op}; only F.linear / F.conv* uses of a bare tensor are solved (eq. 6)")
    reasons = _ineligible(by_weight, recorder, bare)
    for key, uses in by_weight.items():
        owner, attr = key
        name = f"{owner}.{attr}" if owner else attr
        if key in reasons:
            skipped[name] = reasons[key]
            continue
        tensor, owner_module = next((t, m) for o, a, t, m in bare.values() if (o, a) == key)
        full = tensor.shape[0]
        for k, use in enumerate(sorted(uses, key=lambda u: u.weight[1])):
            rows = use.weight[1:]
            bias_full = next((t.shape[0] for o, a, t, _ in bare.values() if (o, a) == use.bias[0]), None) \
                if use.bias else None
            adapter = FunctionalAdapter(attr, use.bias[0][1] if use.bias else None, rows, full, use.shadow,
                                        use.external is not None, slot=k,
                                        bias_rows=use.bias[1:] if use.bias else None, bias_full=bias_full)
            pl = PlannedLayer(name + (f"[{rows[0]}:{rows[1]}]" if rows != (0, full) else ""), owner_module)
            _record_use(pl, use, adapter)
            units.append(pl)
    return units, skipped


def _tiles(blocks: list[tuple[int, int]], full: int) -> bool:
    blocks = sorted(blocks)
    return blocks[0][0] == 0 and blocks[-1][1] == full and all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))


_PRODUCTS = ("mm", "matmul", "einsum", "tensordot", "linear", "conv", "bilinear")


def _multiplies(op: str, t: Tensor) -> bool:
    """Whether a bare Parameter's first computing op ``op`` makes it a linear map left in weight space: a
    matrix (2-D) in a matrix product (addmm, ``@``, matmul, einsum, ...) or transposed for one; a stack of
    matrices (≥3-D, more than one: Mixtral's experts, indexed per expert or transposed for a grouped matmul)
    whatever it is computed with. Lookups (embeddings), additions (position embeddings, (1, N, D)) and a 2-D
    table indexed are not."""
    if t.dim() < 2:
        return False
    if t.dim() >= 3 and t.shape[0] > 1:
        return "embedding" not in op
    base = op.rsplit(".", 1)[-1].strip("_")
    return any(p in base for p in _PRODUCTS) or base in ("t", "T", "mT", "transpose", "permute")


def _ineligible(by_weight: dict, recorder: Recorder, bare: dict) -> dict:
    """Why each bare weight (key) cannot be solved at its uses: computed with by another op; its rows not
    used exactly once each; or its bias (a bare tensor whose row blocks may serve several weights, as
    q/k/v_proj_weight share in_proj_bias) computed with otherwise, not tiled, or serving an ineligible
    weight."""
    size = {(o, a): t.shape[0] for o, a, t, _ in bare.values()}
    reasons = {}
    for key, uses in by_weight.items():
        if key in recorder.others:
            reasons[key] = f"it is also computed with by {recorder.others[key]}"
        elif not _tiles([u.weight[1:] for u in uses], size[key]):
            reasons[key] = f"its rows are used as {sorted(u.weight[1:] for u in uses)}, not once each"
        elif len({u.bias is None for u in uses}) > 1:
            reasons[key] = "some of its uses take a converted bias and some do not"
    by_bias: dict = {}
    for u in recorder.uses:
        if u.bias:
            by_bias.setdefault(u.bias[0], []).append(u)
    changed = True
    while changed:
        changed = False
        for bias, uses in by_bias.items():
            why = None
            if bias in recorder.others:
                why = f"its bias is also computed with by {recorder.others[bias]}"
            elif bias not in size or not _tiles([u.bias[1:] for u in uses], size[bias]):
                why = "its bias is not a bare tensor whose rows are used once each"
            elif any(u.weight[0] in reasons for u in uses):
                why = "its bias also serves a weight that stays in weight space"
            if why:
                for u in uses:
                    if u.weight[0] in by_weight and u.weight[0] not in reasons:
                        reasons[u.weight[0]], changed = why, True
    return reasons
