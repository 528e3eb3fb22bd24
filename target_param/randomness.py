"""The reference pass's own random numbers.

A model with dropout (or another random layer) active draws random numbers in its reference pass (Algorithm 2
runs the model's own forward on X̄). Those draws do not come from the global stream: the training forward that
follows sees the global random state it would see without the pass. That is what activation checkpointing
relies on: ``checkpoint(model, x)`` saves the global state before the model's forward (before the pass), and its
recomputation, which runs no pass, restores it; a pass drawing from the global stream would shift every later
dropout mask of the first forward away from the recomputation's, and the gradients would be those of other
masks, with the same loss.

The pass is seeded by a hash of the global CPU generator's state at its start, read and not advanced: the same
global state (a resumed run with its RNG state restored, a deep copy stepped alike) gives the same pass, and a
state the training has moved on gives another. The seed of the last pass is kept, so that it can be replayed
exactly (reentrant checkpointing's flush, see ``recompute``).
"""
from __future__ import annotations

import contextlib
import hashlib

import torch

__all__ = ["PassRandomness"]

_SALT = b"target_param reference pass"  # another stream than the global state's own


class PassRandomness:
    """Seeds for the reference passes of one converted model; the global random state is left as it was."""

    def __init__(self):
        self.last: int | None = None

    @contextlib.contextmanager
    def fresh(self, devices):
        """A new pass: seeded from the global state, on the CPU and the CUDA ``devices``, for its duration."""
        state = torch.random.default_generator.get_state().numpy().tobytes()
        self.last = int.from_bytes(hashlib.blake2b(state, key=_SALT, digest_size=8).digest(), "little") >> 1
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
