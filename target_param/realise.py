"""The realisation engine: Algorithm 2 (SCU) and its optimistic variant (OCU, eq. 8).

One *reference pass* runs the model's own forward on the fixed reference batch X̄. When a converted layer j
is reached, its input ``A[0:j)`` is whatever actually arrives (so residual and concatenation topologies are
followed as executed) and its weights are solved, ``W[0:j] = T_j A[0:j)^‡``; the layer then computes
``S_j = W[0:j] A[0:j)`` and passes it on (SCU), or passes its target ``T_j`` on instead (OCU). With grad
enabled the solved weights carry the autograd graph back to every target, so backpropagation through the
training forward (Algorithm 1) and this pass gives exactly Algorithm 3.

The reference pass runs the planner's torch.fx graph when the model traced: each converted Linear/Conv
call there is replaced by :class:`ReferenceCall`, which solves the layer and returns ``S_j`` from the same
solve (no second product, and one backward for both uses of ``W``); its max pooling with
non-overlapping windows keeps only the argmax for backward, not its input (:func:`lean_max_pool`).
Layers the graph cannot reach (inside a leaf module, recurrent, or carrying user hooks) and untraceable
models are solved by the layer's own forward (``Realiser.layer_call``, installed on the class that
parametrize generates for it), after any forward pre-hooks and before any forward hooks. A converted
layer carries no hook of ours, so outside the reference pass it costs what a plain layer costs.

Cholesky failures and non-finite weights are checked once per realisation (one synchronisation; on CUDA
the solves avoid LAPACK's own checks, see ``solver.SYNC_FREE_DEVICES``, and a cached factor adds the
``torch.equal`` of its input); only a failure repeats the pass carefully, layer by layer (``solver.Solves``).

When realisation happens:
  * every grad-enabled forward of the converted root realises once (gradient accumulation works);
  * otherwise the realised weights are reused until a parameter or buffer of the root changes (tensor
    versions catch ``opt.step()`` and in-place edits) or a module changes train/eval mode;
  * reading ``layer.weight`` / ``layer.bias`` outside a forward realises first if anything is stale;
  * a grad-enabled forward on exactly the reference batch (full-batch training, X = X̄), under SCU, with
    nothing random in the graph, *is* the reference pass: Algorithms 1 and 2 then share one forward pass.
    The model's own forward runs once, with its side effects (BatchNorm's running statistics are updated
    once, as by any training forward), and each layer is solved as it is called (``layer_call``); see
    ``Realiser.is_reference_call``.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import BackwardCFunction
from torch.nn.modules import module as _module
from torch.nn.modules.batchnorm import _NormBase

from .errors import (FunctionalWeightUseError, LayerReusedError, ReferenceBatchError, ReferencePassError, SolveError,
                     TargetSpaceError, UnsupportedHabitError, excluding)
from .distributed import ANCHOR, scaled
from .functional import FunctionalAdapter, ReferenceUses
from .layers import Adapter, FeedForwardAdapter, positional
from .parametrization import ridge_lams
from .randomness import PassRandomness
from .norms import frozen_running_stats
from .recompute import Recomputation, checkpointing_off, in_backward
from .solver import (SYNC_FREE_DEVICES, Solves, autocast_off, autocast_on, contents_version, plain_autograd,
                     memory_stamp)

__all__ = ["Realiser", "ConvertedLayer", "ReferenceCall", "lean_max_pool"]
IDLE, FORWARD, REFERENCE, FROZEN = "idle", "forward", "reference", "frozen"


@dataclass
class ConvertedLayer:
    name: str
    module: nn.Module
    adapter: Adapter


def _fingerprint(t: Tensor) -> tuple:
    """Identity, in-place version and storage of a tensor (torch.func wrappers have no storage)."""
    try:
        return id(t), *contents_version(t)
    except RuntimeError:
        return id(t), None, None


def reused_error(calls: dict[str, int]) -> LayerReusedError:
    """One error for every layer that runs more than once per forward (``calls``: name → calls)."""
    names = list(calls)
    return LayerReusedError(
        "Layer " + ", layer ".join(f"'{n}' runs {c} times" for n, c in calls.items()) + " in one forward pass; a "
        "target-space layer must run exactly once, because its weights are solved from its one input on the "
        "reference batch (eq. 6).",
        f"Exclude {'it' if len(names) == 1 else 'them'} with filter_fn={excluding(names)} (then in weight space).",
        **({"layer": names[0], "calls": calls[names[0]]} if len(names) == 1 else {"layers": calls}),
    )


def _solve_alive(node, depth: int = 8) -> bool:
    """Whether the custom-Function node nearest to ``node`` along first inputs (through at most ``depth``
    views and copies) still holds its saved tensors (a backward without ``retain_graph`` frees them)."""
    for _ in range(depth):
        if node is None:
            return False
        if isinstance(node, BackwardCFunction):
            try:
                node.saved_tensors
            except RuntimeError:
                return False
            return True
        node = node.next_functions[0][0] if node.next_functions else None
    return False


def _eager(fn):
    """``fn`` run eagerly when torch.compile reaches it (a graph break: the reference pass and its bookkeeping
    are Python with data-dependent checks), and called directly otherwise (``torch.compiler.disable``'s
    wrapper costs 1.5 µs a call here, at every forward)."""
    disabled = torch.compiler.disable(fn, reason=(
        "target_param: the reference pass (Algorithm 2) runs eagerly, outside the compiled graph; compile the "
        "converted model with torch.compile(model) (graph breaks allowed), not fullgraph=True"))

    @functools.wraps(fn)
    def run(*args):
        return disabled(*args) if torch.compiler.is_compiling() else fn(*args)
    return run


def _normal_tensors() -> contextlib.AbstractContextManager:
    """Under ``torch.inference_mode`` the reference pass makes normal tensors, without a graph: realised
    weights stay usable (and their inputs' versions readable) once inference mode is left."""
    if not torch.is_inference_mode_enabled():
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.no_grad())
    return stack


def _saved_tensors_hooks() -> bool:
    """Whether saved-tensor hooks are active (non-reentrant checkpointing, ``save_on_cpu``, ...)."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def _keep(t: Tensor) -> Tensor:
    return t


def _own_saved_tensors() -> contextlib.AbstractContextManager:
    """The reference pass keeps the tensors its backward needs itself, outside any saved-tensor hooks: a
    non-reentrant checkpoint around the converted model recomputes its forward without realising (see
    ``recompute``), so the pass's saved tensors must not be counted among the region's."""
    if not _saved_tensors_hooks():
        return contextlib.nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(_keep, _keep)


_NO_MODE = contextlib.nullcontext()


class _ReadBeforeRun(Exception):
    """A converted tensor was read during a reference pass without the functional mode, before its layer ran
    (see ``Realiser._unsolved``)."""


def _global_hooks() -> bool:
    return bool(_module._global_forward_pre_hooks or _module._global_forward_hooks)


class ReferenceCall(nn.Module):
    """Stands in for converted layer ``index`` in the reference graph: solves it and returns ``S_j``."""

    def __init__(self, realiser, index: int):
        super().__init__()
        self.realiser, self.index = realiser, index

    def forward(self, *args):
        return self.realiser.reference_call(self.index, args)


_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_UNPOOL = {1: F.max_unpool1d, 2: F.max_unpool2d, 3: F.max_unpool3d}


class _LeanMaxPool(torch.autograd.Function):
    """Max pooling with non-overlapping windows that keeps only its argmax for backward, not its input:
    each input position is in at most one window, so the backward is exactly ``max_unpool``."""

    @staticmethod
    def forward(ctx, x, nd, kernel, stride, padding, ceil_mode):
        out, index = _POOL[nd](x, kernel, stride, padding, 1, ceil_mode, return_indices=True)
        ctx.save_for_backward(index)
        ctx.args = nd, kernel, stride, padding, x.shape[-nd:]
        return out

    @staticmethod
    def backward(ctx, grad):
        nd, kernel, stride, padding, size = ctx.args
        return _UNPOOL[nd](grad, ctx.saved_tensors[0], kernel, stride, padding, size), None, None, None, None, None


def lean_max_pool(x, nd, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """``F.max_pool{nd}d`` in the reference pass: by :class:`_LeanMaxPool` when the windows do not overlap
    (stride = kernel, no dilation), which saves the memory of the pooled input until backward."""
    def tup(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd
    kernel, step = tup(kernel_size), tup(kernel_size if stride is None or stride == [] else stride)
    if return_indices or kernel != step or set(tup(dilation)) != {1} or not x.requires_grad or plain_autograd():
        return _POOL[nd](x, kernel_size, stride, padding, dilation, ceil_mode, return_indices)
    return _LeanMaxPool.apply(x, nd, kernel, step, tup(padding), ceil_mode)


def _lean_pool_call(node, gm) -> None:
    """Route a max-pooling node of the reference graph through :func:`lean_max_pool`."""
    nd = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3}.get(node.target) if node.op == "call_function" else None
    if nd is not None:
        node.target, node.args = lean_max_pool, (node.args[0], nd, *node.args[1:])
    elif node.op == "call_module" and not node.kwargs and len(node.args) == 1:
        m = gm.get_submodule(node.target)
        nd = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}.get(type(m))
        if nd is not None and not m._forward_hooks and not m._forward_pre_hooks:
            node.op, node.target = "call_function", lean_max_pool
            node.args = (node.args[0], nd, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode,
                         m.return_indices)


_RANDOM = ("dropout", "rand", "bernoulli", "normal", "rrelu", "multinomial", "uniform", "exponential", "poisson",
           "cauchy", "geometric")


def _random_modules(gm) -> list | None:
    """The dropout-like modules of the reference graph (random in train mode), or None when the graph may
    draw random numbers otherwise (a random function, or a module that is not torch.nn's own)."""
    found = []
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method"):
            name = getattr(node.target, "__name__", str(node.target)).lower()
            if any(r in name for r in _RANDOM):
                return None
        elif node.op == "call_module":
            m = gm.get_submodule(node.target)
            if isinstance(m, (nn.modules.dropout._DropoutNd, nn.RReLU)):
                found.append(m)
            elif not isinstance(m, ReferenceCall) and not type(m).__module__.startswith("torch.nn.modules"):
                return None
    return found


class Realiser:
    """Holds the converted layers of one root module and realises their weights from their targets."""

    def __init__(self, root: nn.Module, layers: list[ConvertedLayer], lam: float, cascade: str, reference,
                 graph_module: nn.Module | None = None, lam_mode: str = "absolute", uses_mode: bool = False,
                 shards=None):
        self.root = root
        self.shards = shards  # a distributed.Shards when the reference batch is sharded across ranks
        self.layers = layers
        # functional units (see functional): (stored key, r0, r1) → layer index; the reference pass then runs
        # under ReferenceUses (also when converted weights are only read outside their module: ``uses_mode``)
        self.units = self._units()
        self.uses_mode = uses_mode or bool(self.units)
        self.uses: ReferenceUses | None = None  # the mode of the reference pass in progress
        self.joined: dict = {}  # (units, name) → a stored tensor assembled from row blocks (see tensor)
        self.lam = float(lam)
        # lam_mode="relative": each target's λ_j is the buffer `lam` of its parametrization (ridge_lams)
        self.relative = lam_mode == "relative"
        self.cascade = cascade
        self.reference = reference  # [(buffer name, None) | (None, constant)] per positional input
        self.graph_module = graph_module and self._reference_graph(graph_module)
        self.random = _random_modules(self.graph_module) if self.graph_module is not None else None
        self.careful = False  # set for good after a deferred check failed (see solver.Solves)
        self.solves: Solves | None = None
        self.cache: list | None = None
        self.pending: list | None = None
        self.calls: list[int] = []
        self.order: list[int] = []
        self.capture: list | None = None
        self.key = None
        self.realisations = 0
        self.phase = IDLE
        self.depth = 0
        self.inline = False  # the root's own forward is the reference pass (see root_pre_hook)
        self.inline_checkpoints = None  # checkpointing_off() for the length of an inline pass
        self.equal_inputs = {}  # per reference buffer: the last input found equal to it, and the versions then
        self.merges = 0
        self.recompute = Recomputation()  # weight reads inside a backward (activation checkpointing)
        self.randomness = PassRandomness()  # the reference pass's own random stream

    def __getstate__(self):
        # Realised tensors carry autograd graphs and are recomputed on demand: never copy or pickle them.
        state = dict(self.__dict__)
        state.update(cache=None, pending=None, capture=None, key=None, phase=IDLE, depth=0,
                     solves=None, inline=False, inline_checkpoints=None, equal_inputs={}, recompute=Recomputation(), uses=None, joined={})
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.units = self._units()  # keyed by the identity of the (copied) owners

    def _units(self) -> dict:
        return {((id(layer.module), layer.adapter.weight), *layer.adapter.rows): i
                for i, layer in enumerate(self.layers) if isinstance(layer.adapter, FunctionalAdapter)}

    def _reference_graph(self, gm: nn.Module) -> nn.Module:
        """Route the graph's calls of converted Linear/Conv layers through :class:`ReferenceCall`, and its
        max pooling through :func:`lean_max_pool`."""
        index = {id(layer.module): i for i, layer in enumerate(self.layers)
                 if isinstance(layer.adapter, FeedForwardAdapter)}
        for node in gm.graph.nodes:
            _lean_pool_call(node, gm)
            if node.op == "call_module" and not node.kwargs:
                i = index.get(id(gm.get_submodule(node.target)))
                if i is not None:
                    gm.add_submodule(f"target_space_call_{i}", ReferenceCall(self, i))
                    node.target = f"target_space_call_{i}"
        gm.recompile()
        return gm

    # ---------------------------------------------------------------- state
    def targets(self, i: int) -> dict[str, Tensor]:
        """The targets of layer i, by the name of the tensor whose parametrization holds them."""
        layer = self.layers[i]
        if type(layer.adapter) is FunctionalAdapter:
            return layer.adapter.target_tensors(layer.module)
        lists = layer.module.__dict__["_modules"]["parametrizations"]._modules  # nn.Module.__getattr__, unrolled
        return {n: lists[n]._parameters["original"] for n in layer.adapter.targets}

    def pass_targets(self, i: int) -> dict[str, Tensor]:
        """The targets of layer i as the reference pass uses them: sharded, each rank's get the gradient of
        the mean loss over the ranks (see ``distributed.scaled``)."""
        targets = self.targets(i)
        if self.shards is None:
            return targets
        anchor = self.root._parameters.get(ANCHOR)
        return {n: scaled(t, self.shards, anchor) for n, t in targets.items()}

    def stored_name(self, key: tuple) -> str:
        """The qualified name of the stored tensor ``(id(owner), attribute)``."""
        owner = next((n for n, m in self.root.named_modules() if id(m) == key[0]), "?")
        return f"{owner}.{key[1]}" if owner else key[1]

    def reference_inputs(self) -> tuple:
        return tuple(getattr(self.root, name) if name else value for name, value in self.reference)

    def state_key(self, modules: list | None = None) -> tuple:
        """Changes whenever anything the reference pass reads may have changed: modes, parameters and
        buffers, but for the running statistics of normalisation layers in train mode, which the pass does
        not read (``frozen_running_stats``) and which every training forward updates."""
        modules = list(self.root.modules()) if modules is None else modules
        return tuple(m.training for m in modules), tuple(
            _fingerprint(t) for m in modules for t in itertools.chain(
                m._parameters.values(), () if m.training and isinstance(m, _NormBase) else m._buffers.values())
            if t is not None)

    def graph_intact(self) -> bool:
        """Whether the realised tensors can still be backpropagated: no backward has freed their graph.
        Probed by the read that needs a graph (rare), not hooked at every realisation: each tensor's nearest
        custom-Function node (the solve that made it; views and copies lie between) still holds its saved
        tensors. A backward through any of them frees those of every solve upstream, so one freed node
        means realise again; so does a tensor whose solve is not found (plain autograd under torch.func), and
        a realisation without any graph (under no_grad)."""
        graph = [t for tensors in self.cache or () for t in tensors.values() if t.requires_grad]
        return bool(graph) and all(_solve_alive(t.grad_fn) for t in graph)

    def needs_graph(self) -> bool:
        return torch.is_grad_enabled() and any(
            t.requires_grad for i in range(len(self.layers)) for t in self.targets(i).values())

    def ensure_fresh(self) -> None:
        if self.cache is None or (self.needs_graph() and not self.graph_intact()) or self.key != self.state_key():
            self.realise()

    # ---------------------------------------------------------------- Algorithm 2
    def realise(self, replay: bool = False) -> object:
        """Run the reference pass once and replace every layer's realised weights (transactionally); returns
        the pass's output (the model's output on the reference batch). ``replay``: with the random state of
        the last pass (see ``randomness``)."""
        prev, self.phase = self.phase, REFERENCE
        inputs = self._begin()
        try:
            try:
                modules = list(self.root.modules())  # one walk of the tree per realisation
                with self._random_state(inputs, replay), frozen_running_stats(self.root, modules), \
                        _normal_tensors(), autocast_off(), _own_saved_tensors(), checkpointing_off(), self._uses():
                    out = (self.graph_module or self.root)(*inputs)
            except SolveError as e:
                raise (self._diagnose(self.pending) or e) from None
            except _ReadBeforeRun:
                self.uses_mode, self.phase = True, prev  # again, with placeholders for such reads
                return self.realise(replay=True)
            except TargetSpaceError:
                raise
            except Exception as e:
                if self._retry_carefully():
                    self.phase = prev
                    return self.realise(replay=True)
                raise ReferencePassError(
                    "The model's forward raised during the reference pass (Algorithm 2, the forward on the "
                    "reference batch X̄ that realises the weights); the realised weights and the targets are "
                    "unchanged.",
                    "The pass runs in the model's current mode (in train mode BatchNorm needs n̄ > 1 patterns, "
                    "for example); the error below names the cause.",
                    training=self.root.training,
                    error=f"{type(e).__name__}: {e}",
                ) from e
            if self._finish(modules):
                self.phase = prev
                return self.realise(replay=True)
        finally:
            self.phase, self.pending, self.solves, self.uses = prev, None, None, None
        return out

    def _random_state(self, inputs: tuple, replay: bool) -> contextlib.AbstractContextManager:
        """The pass draws from the model's own random stream, when anything in it may draw (see randomness)."""
        if self.random is not None and not any(m.training and getattr(m, "p", 1.0) > 0 for m in self.random):
            return _NO_MODE
        devices = sorted({x.device.index or 0 for x in inputs if isinstance(x, Tensor) and x.is_cuda})
        return self.randomness.replayed(devices) if replay else self.randomness.fresh(devices)

    def _uses(self) -> contextlib.AbstractContextManager:
        """The mode that solves functional units (see functional), when the model has them."""
        if not self.uses_mode:
            return contextlib.nullcontext()
        self.uses = ReferenceUses(self)
        return self.uses

    def _begin(self) -> tuple:
        """Start a reference pass: no layer solved yet; the reference inputs."""
        n = len(self.layers)
        self.pending, self.calls, self.order = [None] * n, [0] * n, []
        inputs = self.reference_inputs()
        self.solves = Solves(self.lam, self.careful, tuple(t for t in inputs if isinstance(t, Tensor)), self.shards)
        return inputs

    def _finish(self, modules: list) -> bool:
        """End a reference pass: True to repeat it carefully (a deferred factorisation failed); else the
        solved weights become the realised ones. Raises when a layer did not run or a weight is not finite."""
        for layer, calls in zip(self.layers, self.calls):
            if calls == 0:
                raise ReferenceBatchError(
                    f"Layer '{layer.name}' did not run on the reference batch, so its weights cannot be "
                    "realised.",
                    "Keep the reference path through every converted layer, or exclude the layer.",
                    layer=layer.name,
                )
        if self._check(self.pending):
            return True
        self.cache, self.joined = self.pending, {}
        self.key = self.state_key(modules)
        self.realisations += 1
        return False

    def _retry_carefully(self) -> bool:
        """Whether a deferred factorisation failed: then every later pass is careful (see Solves)."""
        failed = None if self.careful else self.solves.failed()
        if failed is not None and bool(failed):
            self.careful = True
            return True
        return False

    def _check(self, realised: list) -> bool:
        """One synchronisation: True to repeat the pass carefully; raises when a weight is not finite."""
        with torch.no_grad():  # (no_grad does not stop forward-mode AD: under torch.func, detached copies)
            detach = plain_autograd()
            # views (a Linear's weight and bias) are checked through the one tensor they view
            tensors = list({id(u): u for u in (t if t._base is None else t._base for r in realised
                                               for t in r.values())}.values())
            tensors = [t.detach() for t in tensors] if detach else tensors
            norms = torch.stack(torch._foreach_norm(tensors))  # finite iff the weights are (or overflow)
            flags = None if self.careful else self.solves.flags()
            values = (norms if flags is None else torch.cat([norms, flags])).tolist()  # one synchronisation
            if all(math.isfinite(v) for v in values[:len(tensors)]) and not any(values[len(tensors):]):
                return False
        if self._retry_carefully():
            return True
        if not all(bool(torch.isfinite(t).all()) for t in tensors):  # not only a norm that overflowed
            raise self._diagnose(realised)
        return False

    def _diagnose(self, realised: list) -> SolveError | None:
        """Name the first layer, in execution order, where a non-finite value appears."""
        for i in self.order:
            layer = self.layers[i]
            bad = sum(int((~torch.isfinite(t)).sum()) for t in self.targets(i).values())
            if bad:
                return SolveError(
                    f"Layer '{layer.name}': its targets contain {bad} non-finite value(s).",
                    "The step that wrote them diverged; restore the targets (and optimiser state) from a "
                    "checkpoint and lower the learning rate.",
                    layer=layer.name,
                )
            for what, w in (realised[i] or {}).items():
                if not bool(torch.isfinite(w).all()):
                    return SolveError(
                        f"Layer '{layer.name}': the realised {what} is not finite.",
                        "A NaN/Inf reached the layer's input on the reference batch; the targets were left "
                        "unchanged. Raise lam, or check the layers before it.",
                        layer=layer.name,
                        nonfinite=int((~torch.isfinite(w)).sum()),
                    )
        return None

    @torch.no_grad()
    def project(self) -> None:
        """Eq. 13: run Algorithm 2 once and set every target to the sums it achieves, ``T_j ← S_j``."""
        self.capture = [None] * len(self.layers)
        try:
            self.realise()
            captured = self.capture
        finally:
            self.capture = None
        for i, sums in enumerate(captured):
            for name, t in self.targets(i).items():
                t.copy_(sums[name])

    # ---------------------------------------------------------------- calls in the reference pass; root hooks
    def _solve(self, i: int, args: tuple):
        """Realise layer i from its input on the reference batch; its output there, if the solve gives it."""
        self.calls[i] += 1
        if self.calls[i] > 1:
            raise reused_error({self.layers[i].name: self.calls[i]})
        self.order.append(i)
        layer = self.layers[i]
        if self.relative:
            lams = layer.adapter.lams(layer.module) if type(layer.adapter) is FunctionalAdapter else \
                ridge_lams(layer.module, layer.adapter.targets)
            solves = self.solves.scoped(lams)
        else:
            solves = self.solves
        targets = self.pass_targets(i)
        # (the solve's own ops run outside the functional mode)
        with _NO_MODE if self.uses is None else torch._C.DisableTorchFunction():
            self.pending[i], out = layer.adapter.realise(layer.module, args, targets, solves, layer.name,
                                                         self.cascade == "optimistic")
        return out

    def _passed_on(self, i: int, args: tuple, output):
        """What layer i passes on in the reference pass: ``S_j`` (SCU), or ``T_j`` (OCU, eq. 8)."""
        layer = self.layers[i]
        if self.capture is not None:
            sums = layer.adapter.sums(layer.module, args, output)
            self.capture[i] = {k: v.detach().clone() for k, v in sums.items()}
        if self.cascade == "optimistic":
            return layer.adapter.optimistic(layer.module, output, self.pass_targets(i))
        return output

    def functional_call(self, i: int, x: Tensor):
        """Functional unit i's F.linear/F.conv* call in the reference pass (see functional.ReferenceUses):
        solved from its input ``x``; what it passes on."""
        return self._passed_on(i, (x,), self._solve(i, (x,)))

    def reference_call(self, i: int, args: tuple):
        """Layer i's call in the reference graph (see :class:`ReferenceCall`)."""
        m = self.layers[i].module
        if m._forward_pre_hooks or m._forward_hooks or _global_hooks():
            return m(*args)  # someone's hooks must run too: the layer's own forward solves it (layer_call)
        return self._passed_on(i, args, self._solve(i, args))

    def layer_call(self, i: int, base, module: nn.Module, args: tuple, kwargs: dict):
        """The forward of converted layer i (``parametrization.install``): the class's own ``base``, except
        in the reference pass, where the layer is solved from its input (after any forward pre-hooks, so
        from the input it computes with) and passes on what the solve gives (``S_j``), else its output."""
        if self.phase != REFERENCE:
            return base(module, *args, **kwargs)
        return self._reference_layer(i, base, module, args, kwargs)

    @_eager  # (a compiled forward on the reference batch, X = X̄, solves each layer eagerly: a graph break)
    def _reference_layer(self, i: int, base, module: nn.Module, args: tuple, kwargs: dict):
        inputs = positional(base, module, args, kwargs)
        solved = self._solve(i, inputs)
        return self._passed_on(i, inputs, base(module, *args, **kwargs) if solved is None else solved)

    @_eager
    def root_pre_hook(self, module: nn.Module, args, kwargs):
        if self.phase != IDLE:
            if self.phase == FORWARD or self.inline:
                self.depth += 1  # the root called inside its own forward
            return None
        self.depth = 0
        if torch._C._is_tracing() or torch.compiler.is_exporting():
            raise UnsupportedHabitError(
                "A converted model cannot be traced or exported: its weights are recomputed from the targets by "
                "a reference pass in Python at every training forward (Algorithm 2).",
                "Convert it back first, tp.to_weight_space(model), then trace or export the plain model (the "
                "same function, at zero inference cost).",
                tracer="torch.jit.trace" if torch._C._is_tracing() else "torch.export",
            )
        if in_backward():  # checkpointing's recomputation: the weights of the first forward (see recompute)
            self.phase = FORWARD
            return None
        if self.needs_graph():
            if self.is_reference_call(args, kwargs):
                # Full-batch training, X = X̄: the forward about to run is the reference pass (Algorithms 1
                # and 2 share one forward pass); root_done_hook ends it.
                self._begin()
                self.phase, self.inline = REFERENCE, True
                self.inline_checkpoints = checkpointing_off()  # (the pass's own graph is kept whole; see recompute)
                self.inline_checkpoints.__enter__()
                return None
            self.realise()
        else:
            self.ensure_fresh()
        self.phase = FORWARD
        return None

    @_eager
    def root_done_hook(self, module: nn.Module, args, kwargs, output):
        """The root's forward returned (not called when it raised); the first of its forward hooks. Ends an
        inline reference pass, so that later forward hooks see an ordinary forward."""
        if not self.inline or self.depth:
            return None
        self._end_inline()
        try:
            repeat = self._finish(list(self.root.modules()))
        except SolveError as e:
            raise (self._diagnose(self.pending) or e) from None
        finally:
            self.phase, self.pending, self.solves = IDLE, None, None
        if repeat:
            output = self.realise()  # carefully, by the graph: the forward's output with those weights
        self.merges += 1
        self.phase = FORWARD
        return output if repeat else None

    @_eager
    def root_post_hook(self, module: nn.Module, args, kwargs, output):
        """The last of the root's forward hooks, whether the forward returned or raised (``always_call``)."""
        if self.phase != FORWARD and not self.inline:
            return None
        if self.depth:
            self.depth -= 1
            return None
        if self.inline:  # the forward raised during an inline reference pass: nothing was realised
            self._end_inline()
            if not self.careful:
                self._retry_carefully()  # a failed factor makes later passes careful
        self.phase, self.pending, self.solves = IDLE, None, None
        return None

    def _end_inline(self) -> None:
        self.inline = False
        checkpoints, self.inline_checkpoints = self.inline_checkpoints, None
        if checkpoints is not None:
            checkpoints.__exit__(None, None, None)

    def is_reference_call(self, args: tuple, kwargs: dict) -> bool:
        """Whether the root is called on exactly its reference batch, with SCU, nothing random in its fx
        graph, and no other hook that could change what its forward sees: the training forward (Algorithm 1)
        then equals the reference pass (Algorithm 2) as a function of the targets, so one forward serves as
        both, with the same gradient (section 2.3, X = X̄)."""
        if kwargs or self.cascade != "sequential" or self.graph_module is None or self.random is None \
                or self.uses_mode \
                or len(args) != len(self.reference) or len(self.root._forward_pre_hooks) > 1 or _global_hooks() \
                or autocast_on() or _saved_tensors_hooks():
            return False  # (a later forward pre-hook of the root could change the input the forward sees; under
            # autocast the reference pass runs in full precision, the training forward does not; a checkpointed
            # forward is recomputed without the pass)
        if any(m.training and getattr(m, "p", 1.0) > 0 for m in self.random):
            return False
        for arg, (name, value) in zip(args, self.reference):  # the cheap checks first: no pass over the input
            if name is None:
                if arg is not value:
                    return False
                continue
            ref = getattr(self.root, name)
            if not isinstance(arg, Tensor) or arg.shape != ref.shape or arg.dtype != ref.dtype \
                    or arg.device != ref.device:
                return False
            if arg is not ref and memory_stamp(arg) != memory_stamp(ref):
                # the last tensor found equal (at conversion: the user's reference batch itself), if it and the
                # reference are unchanged since: no pass over them
                stamp = contents_version(arg) + contents_version(ref)
                last = self.equal_inputs.get(name)
                if last is None or last[0] is not arg or last[1] is not ref or last[2] != stamp:
                    if arg.device.type in SYNC_FREE_DEVICES:
                        return False  # (comparing values would synchronise with the host: a separate pass)
                    if not torch.equal(arg, ref):
                        return False
                    self.equal_inputs[name] = (arg, ref, stamp)
        return True

    def remember_equal(self, name: str, arg: Tensor) -> None:
        """``arg`` holds the values of reference buffer ``name`` now (the tensor the buffer was copied from)."""
        ref = getattr(self.root, name)
        self.equal_inputs[name] = (arg, ref, contents_version(arg) + contents_version(ref))

    def tensor(self, i, which: str) -> Tensor:
        """The realised tensor ``which`` (e.g. "weight") of layer i, as the parametrization returns it; ``i`` is
        a tuple of functional units for a tensor assembled from their row blocks (see functional)."""
        if self.phase == REFERENCE:
            if i.__class__ is int:
                wb = self.pending[i]
                return self._unsolved(i, which) if wb is None else wb[which]
            parts = [self.pending[j] for j in i]
            if any(p is None for p in parts):
                return self._unsolved(i, which)
            return torch.cat([p[which] for p in parts])
        if not torch.compiler.is_compiling() and in_backward():  # checkpointing's recomputation: never a
            return self.recompute.tensor(self, i, which)  # realisation there (see recompute)
        if self.phase == IDLE:
            self.ensure_fresh()
        return self.cache[i][which] if i.__class__ is int else self.realised(i, which)

    def realised(self, i, which: str) -> Tensor:
        """The realised tensor of the last realisation (row blocks assembled once per realisation)."""
        if not isinstance(i, tuple):
            return self.cache[i][which]
        t = self.joined.get((i, which))
        if t is None:
            t = self.joined[(i, which)] = torch.cat([self.cache[j][which] for j in i])
        return t

    def _unsolved(self, i, which: str) -> Tensor:
        """A read, during the reference pass, of a tensor whose layer has not been solved yet: a placeholder
        under the functional mode (see functional.ReferenceUses), else an error."""
        first = i[0] if isinstance(i, tuple) else i
        layer = self.layers[first]
        shape = layer.adapter.stored_shape(which) if isinstance(layer.adapter, (FunctionalAdapter,
                                                                                FeedForwardAdapter)) else None
        if self.uses is not None and shape is not None:
            like = next(iter(self.targets(first).values()))
            return self.uses.placeholder(layer.module, which, like, shape)
        if shape is not None and not self.inline:
            # a read that conversion did not see (e.g. nn.TransformerEncoderLayer's fast-path checks, which run
            # in eval mode only): the pass is repeated under the functional mode, which tells reads from uses
            raise _ReadBeforeRun()
        self.uses_mode = shape is not None  # (a later pass runs under the mode; this forward cannot)
        name = layer.name
        raise FunctionalWeightUseError(
            f"The weight of layer '{name}' was read during the reference pass before the layer ran: "
            "it is used functionally (e.g. F.linear(x, layer.weight)) outside the module's forward, "
            "so its input A is unknown.",
            "Exclude it with filter_fn=lambda module, name: name != '%s'." % name,
            layer=name,
        )

