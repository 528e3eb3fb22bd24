"""The reference pass's own random numbers.

A model with dropout (or another random layer) active draws random numbers in its reference pass (Algorithm 2
runs the model's own forward on X̄). Those draws come from a stream of the converted model's own, never from
the global one: the training forward that follows sees the global random state it would see without the pass.
That is what activation checkpointing relies on: ``checkpoint(model, x)`` saves the global state before the
model's forward (before the pass), and its recomputation, which runs no pass, restores it; a pass drawing from
the global stream would shift every later dropout mask of the first forward away from the recomputation's, and
the gradients would be those of other masks, with the same loss.

Each pass is seeded from a Python ``random.Random`` of the realiser's (a copy of the model continues the same
sequence), and the seed of the last pass is kept, so that the pass can be replayed exactly (reentrant
checkpointing's flush, see ``recompute``).
"""
from __future__ import annotations

import contextlib
import random

import torch

__all__ = ["PassRandomness"]

_SALT = 0x7A5E_0F_5EED  # the stream differs from the one torch.manual_seed(initial_seed) starts


class PassRandomness:
    """Seeds for the reference passes of one converted model; the global random state is left as it was."""

    def __init__(self, seed: int | None = None):
        self.stream = random.Random((torch.initial_seed() if seed is None else seed) ^ _SALT)
        self.last: int | None = None

    @contextlib.contextmanager
    def fresh(self, devices):
        """A new pass: the next seed of the stream, on the CPU and the CUDA ``devices``, for its duration."""
        self.last = self.stream.getrandbits(63)
        with self.replayed(devices):
            yield

    @contextlib.contextmanager
    def replayed(self, devices):
        """The random state of the last pass again (nothing when no pass has drawn)."""
        if self.last is None:
            yield
            return
        with torch.random.fork_rng(devices=list(devices)):
            torch.random.default_generator.manual_seed(self.last)
            for d in devices:
                torch.cuda.default_generators[d].manual_seed(self.last)
            yield
