"""Weight reads inside a backward: the recomputation of activation checkpointing
(``torch.utils.checkpoint.checkpoint``, ``checkpoint_sequential``, timm's ``set_grad_checkpointing``).

A checkpointed block runs its forward again during the backward. No realisation runs then: the block must see
the weights its first forward saw, and a reference pass inside the engine would run under checkpoint's
saved-tensor hooks. Inside a backward the realised tensors are handed out as *proxies*: detached leaves with
the same values.

* Non-reentrant checkpointing (``use_reentrant=False``) keeps only the recomputed values; gradients flow
  through the graph of the first forward, which reached the realised weights themselves. Proxies get none.
* Reentrant checkpointing (``use_reentrant=True``) ran its first forward without a graph and backpropagates
  the recomputed block by a nested backward. Through the realised weights that nested backward would go on
  into the solves of Algorithm 3, which every layer shares, and free them. It stops at the proxies instead,
  whose ``.grad`` collects ``dL/dW``. When the outer backward ends (an engine callback) those gradients are
  sent through the solves: through the realised tensors' own graph where it is intact, else through a new
  reference pass with the same targets, buffers and random state (``randomness``), which realises the same
  weights. The target gradients equal the un-checkpointed model's (tested); the price is that extra pass and
  its backward.

Checkpointing *inside* the reference pass (a model that checkpoints its own blocks: Hugging Face's
``gradient_checkpointing_enable()``, timm's ``set_grad_checkpointing``, a hand-written ``checkpoint(block, x)``)
is switched off for the pass (:func:`checkpointing_off`): the pass's whole graph is needed anyway, since every
realised weight depends on the activations of the layers before it on X̄ (SCU), and a recomputation, which
runs no solve, could not repeat the pass's saved tensors (non-reentrant), nor could a forward without a graph
(reentrant) give the solves their cascade. The training forward's checkpoints are untouched.
"""
from __future__ import annotations

import contextlib

import torch
import torch.utils.checkpoint
from torch import Tensor

__all__ = ["in_backward", "Recomputation", "checkpointing_off"]


def _run(function, args, kwargs, **_options):
    return function(*args, **kwargs)


@contextlib.contextmanager
def checkpointing_off():
    """``torch.utils.checkpoint.checkpoint`` (and so ``checkpoint_sequential`` and every wrapper of it) runs its
    function plainly for the length of the block. Every call of ``checkpoint`` goes through the module's
    ``_checkpoint_impl`` (torch ≥ 2.6), whatever name the caller bound ``checkpoint`` to."""
    module = torch.utils.checkpoint
    impl = getattr(module, "_checkpoint_impl", None)
    if impl is None:
        yield
        return
    module._checkpoint_impl = _run
    try:
        yield
    finally:
        module._checkpoint_impl = impl


def in_backward() -> bool:
    """Whether the caller runs inside the autograd engine (a backward pass, hooks and callbacks included)."""
    return torch._C._current_graph_task_id() != -1


class Recomputation:
    """The proxies handed out inside one backward."""

    def __init__(self):
        self.proxies: dict = {}  # (layer index, tensor name) -> (realised tensor, proxy)
        self.queued = False

    def tensor(self, realiser, i: int, which: str) -> Tensor:
        """Layer i's realised ``which`` for a read inside a backward: no realisation; a proxy when the read
        may build a graph."""
        realised = realiser.realised(i, which)
        if not realiser.needs_graph():  # (a cache realised without a graph, under no_grad, still gets proxies)
            return realised
        entry = self.proxies.get((i, which))
        if entry is None or entry[0] is not realised:
            entry = self.proxies[(i, which)] = (realised, realised.detach().requires_grad_())
        if not self.queued:
            torch.autograd.Variable._execution_engine.queue_callback(lambda: self.flush(realiser))
            self.queued = True
        return entry[1]

    def flush(self, realiser) -> None:
        """At the end of the outer backward: send the proxies' gradients through the solves."""
        self.queued = False
        pending = [(key, proxy.grad) for key, (_, proxy) in self.proxies.items() if proxy.grad is not None]
        self.proxies = {}
        if not pending:
            return
        with torch.enable_grad():
            if not realiser.graph_intact():
                realiser.realise(replay=True)
            tensors = [realiser.realised(i, which) for (i, which), _ in pending]
            torch.autograd.backward(tensors, [g for _, g in pending])
