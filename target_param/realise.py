"""The realisation engine: Algorithm 2 (SCU) and its optimistic variant (OCU, eq. 8).

One *reference pass* runs the model's own forward on the fixed reference batch X̄. When a converted layer j
is reached, its input ``A[0:j)`` is whatever actually arrives (so residual and concatenation topologies are
followed as executed) and its weights are solved, ``W[0:j] = T_j A[0:j)^‡``; the layer then computes
``S_j = W[0:j] A[0:j)`` and passes it on (SCU), or passes its target ``T_j`` on instead (OCU). With grad
enabled the solved weights carry the autograd graph back to every target, so backpropagation through the
training forward (Algorithm 1) and this pass gives exactly Algorithm 3.

When realisation happens:
  * every grad-enabled forward of the converted root realises once (gradient accumulation works);
  * otherwise the realised weights are reused until a parameter or buffer of the root changes (tensor
    versions catch ``opt.step()`` and in-place edits) or a module changes train/eval mode;
  * reading ``layer.weight`` / ``layer.bias`` outside a forward realises first if anything is stale.
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from .errors import FunctionalWeightUseError, LayerReusedError, ReferenceBatchError, SolveError, TargetSpaceError
from .layers import Adapter

__all__ = ["Realiser", "ConvertedLayer", "frozen_running_stats", "REALISER_ATTR"]

REALISER_ATTR = "_target_space_realiser"
IDLE, FORWARD, REFERENCE, FROZEN = "idle", "forward", "reference", "frozen"


@dataclass
class ConvertedLayer:
    name: str
    module: nn.Module
    adapter: Adapter


def _fingerprint(t: Tensor) -> tuple:
    """Identity, in-place version and storage of a tensor (torch.func wrappers have no storage)."""
    try:
        return id(t), t._version, t.data_ptr()
    except RuntimeError:
        return id(t), None, None


@contextlib.contextmanager
def frozen_running_stats(root: nn.Module):
    """Normalisation layers keep their running statistics untouched (batch statistics in train mode)."""
    changed = [m for m in root.modules() if isinstance(m, _NormBase) and m.training and m.track_running_stats]
    for m in changed:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in changed:
            m.track_running_stats = True


def reused_error(name: str, calls: int) -> LayerReusedError:
    return LayerReusedError(
        f"Layer '{name}' runs {calls} times in one forward pass; a target-space layer must run exactly "
        "once, because its weights are solved from its one input on the reference batch (eq. 6).",
        "Exclude it with filter_fn=lambda module, name: name != '%s' (it then stays in weight space)." % name,
        layer=name,
        calls=calls,
    )


class Realiser:
    """Holds the converted layers of one root module and realises their weights from their targets."""

    def __init__(self, root: nn.Module, layers: list[ConvertedLayer], lam: float, cascade: str, reference,
                 graph_module: nn.Module | None = None):
        self.root = root
        self.graph_module = graph_module  # the planner's rewritten graph, when functional uses need it
        self.layers = layers
        self.lam = float(lam)
        self.cascade = cascade
        self.reference = reference  # [(buffer name, None) | (None, constant)] per positional input
        self.cache: list | None = None
        self.cache_has_graph = False
        self.pending: list | None = None
        self.calls: list[int] = []
        self.order: list[int] = []
        self.capture: list | None = None
        self.key = None
        self.realisations = 0
        self.phase = IDLE
        self.depth = 0

    def __getstate__(self):
        # Realised tensors carry autograd graphs and are recomputed on demand: never copy or pickle them.
        state = dict(self.__dict__)
        state.update(cache=None, cache_has_graph=False, pending=None, capture=None, key=None, phase=IDLE, depth=0)
        return state

    # ---------------------------------------------------------------- state
    def targets(self, i: int) -> dict[str, Tensor]:
        """The targets of layer i, by the name of the tensor whose parametrization holds them."""
        layer = self.layers[i]
        return {n: layer.module.parametrizations[n].original for n in layer.adapter.targets}

    def reference_inputs(self) -> tuple:
        return tuple(getattr(self.root, name) if name else value for name, value in self.reference)

    def state_key(self) -> tuple:
        """Changes whenever anything the reference pass reads may have changed."""
        modules = list(self.root.modules())  # one walk of the tree per forward, not three
        return tuple(m.training for m in modules), tuple(
            _fingerprint(t) for m in modules for t in itertools.chain(m._parameters.values(), m._buffers.values())
            if t is not None)

    def _graph_used(self, grad: Tensor) -> None:
        self.cache_has_graph = False

    def needs_graph(self) -> bool:
        return torch.is_grad_enabled() and any(
            t.requires_grad for i in range(len(self.layers)) for t in self.targets(i).values())

    def ensure_fresh(self) -> None:
        if self.cache is None or (self.needs_graph() and not self.cache_has_graph) or self.key != self.state_key():
            self.realise()

    # ---------------------------------------------------------------- Algorithm 2
    def realise(self) -> None:
        """Run the reference pass once and replace every layer's realised weights (transactionally)."""
        prev, self.phase = self.phase, REFERENCE
        self.pending, self.calls, self.order = [None] * len(self.layers), [0] * len(self.layers), []
        try:
            try:
                with frozen_running_stats(self.root):
                    (self.graph_module or self.root)(*self.reference_inputs())
            except SolveError as e:
                raise (self._diagnose(self.pending) or e) from None
            except TargetSpaceError:
                raise
            except Exception as e:
                raise ReferenceBatchError(
                    "The model's forward raised on the reference batch during realisation; the realised "
                    "weights and the targets are unchanged.",
                    "The reference pass runs in the model's current mode: in train mode, BatchNorm needs "
                    "n̄ > 1 patterns, for example.",
                    training=self.root.training,
                    error=f"{type(e).__name__}: {e}",
                ) from e
            for layer, calls in zip(self.layers, self.calls):
                if calls == 0:
                    raise ReferenceBatchError(
                        f"Layer '{layer.name}' did not run on the reference batch, so its weights cannot be "
                        "realised.",
                        "Keep the reference path through every converted layer, or exclude the layer.",
                        layer=layer.name,
                    )
            self._check_finite(self.pending)
            self.cache, self.cache_has_graph = self.pending, False
            graph = [t for tensors in self.cache for t in tensors.values() if t.requires_grad]
            if graph:
                # A backward through these frees their graph: the next read that needs one realises again.
                self.cache_has_graph = True
                for t in graph:
                    t.register_hook(self._graph_used)
        finally:
            self.phase, self.pending = prev, None
        self.key = self.state_key()
        self.realisations += 1

    def _check_finite(self, realised: list) -> None:
        flags = torch.stack([torch.isfinite(t).all() for tensors in realised for t in tensors.values()])
        if not bool(flags.all()):
            raise self._diagnose(realised)

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

    # ---------------------------------------------------------------- hooks
    def layer_pre_hook(self, i: int, args) -> None:
        if self.phase == REFERENCE:
            self.calls[i] += 1
            if self.calls[i] > 1:
                raise reused_error(self.layers[i].name, self.calls[i])
            self.order.append(i)
            layer = self.layers[i]
            self.pending[i] = layer.adapter.realise(layer.module, args, self.targets(i), self.lam, layer.name,
                                                    self.cascade == "optimistic")
        elif self.phase == IDLE:
            self.ensure_fresh()

    def layer_post_hook(self, i: int, args, output):
        if self.phase != REFERENCE:
            return None
        layer = self.layers[i]
        if self.capture is not None:
            sums = layer.adapter.sums(layer.module, args, output)
            self.capture[i] = {k: v.detach().clone() for k, v in sums.items()}
        if self.cascade == "optimistic":  # OCU (eq. 8): pass the targets on, not the achieved sums
            return layer.adapter.optimistic(layer.module, output, self.targets(i))
        return None

    def root_pre_hook(self, module: nn.Module, args) -> None:
        if self.phase == FORWARD:
            self.depth += 1
        if self.phase != IDLE:
            return
        if self.needs_graph():
            self.realise()
        else:
            self.ensure_fresh()
        self.phase, self.depth = FORWARD, 0

    def root_post_hook(self, module: nn.Module, args, output) -> None:
        if self.phase == FORWARD:
            if self.depth:
                self.depth -= 1
            else:
                self.phase = IDLE

    def tensor(self, i: int, which: str) -> Tensor:
        """The realised tensor ``which`` (e.g. "weight") of layer i, as the parametrization returns it."""
        if self.phase == REFERENCE:
            wb = self.pending[i]
            if wb is None:
                name = self.layers[i].name
                raise FunctionalWeightUseError(
                    f"The weight of layer '{name}' was read during the reference pass before the layer ran: "
                    "it is used functionally (e.g. F.linear(x, layer.weight)) outside the module's forward, "
                    "so its input A is unknown.",
                    "Exclude it with filter_fn=lambda module, name: name != '%s'." % name,
                    layer=name,
                )
            return wb[which]
        if self.phase == IDLE:
            self.ensure_fresh()
        return self.cache[i][which]
