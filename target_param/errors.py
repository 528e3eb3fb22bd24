"""Named exceptions and warnings.

Each message states the rule, then the way out, then ``name: value`` lines, in the style of
``torch.nn.utils.parametrize``.
"""
from __future__ import annotations

__all__ = [
    "TargetSpaceError",
    "TargetSpaceWarning",
    "WeightSpaceWarning",
    "InvalidArgumentError",
    "ReferenceBatchError",
    "ReferencePassError",
    "NoEligibleLayerError",
    "AlreadyConvertedError",
    "NotConvertedError",
    "LayerReusedError",
    "UnsupportedLayerError",
    "UnsupportedHabitError",
    "FunctionalWeightUseError",
    "SolveError",
    "AssignmentError",
    "NotTraceableError",
    "ShardError",
    "RankDeficientWarning",
    "IllConditionedWarning",
    "TraceFallbackWarning",
    "LambdaScaleWarning",
]


def format_message(rule: str, way_out: str | None = None, **values) -> str:
    """``rule``, then ``way_out``, then one ``name: value`` line per value."""
    lines = [rule.rstrip()]
    if way_out:
        lines.append(way_out.rstrip())
    lines += [f"{k}: {v}" for k, v in values.items()]
    return "\n".join(lines)


def excluding(names) -> str:
    """The ``filter_fn`` that leaves the layers ``names`` out, as a user would write it (for error messages)."""
    names = list(names)
    if len(names) == 1:
        return "lambda module, name: name != '%s'" % names[0]
    return "lambda module, name: name not in {%s}" % ", ".join(repr(n) for n in names)


class TargetSpaceError(Exception):
    """Base class of every error raised by target_param."""

    def __init__(self, rule: str, way_out: str | None = None, **values):
        self.rule, self.way_out, self.values = rule, way_out, values
        super().__init__(format_message(rule, way_out, **values))


class InvalidArgumentError(TargetSpaceError, ValueError):
    """An option of ``to_target_space`` is out of its domain (``lam < 0``, unknown ``init``...)."""


class ReferenceBatchError(TargetSpaceError, ValueError):
    """The reference batch is empty, non-finite, on the wrong device/dtype, or rejected by the model."""


class ReferencePassError(TargetSpaceError, RuntimeError):
    """The model's forward raised during a reference pass after conversion (Algorithm 2); the message names
    the cause, and the realised weights and targets are left as they were."""


class NoEligibleLayerError(TargetSpaceError, ValueError):
    """No Linear/Conv/RNN layer was selected, or none of them ran on the reference batch."""


class AlreadyConvertedError(TargetSpaceError, RuntimeError):
    """The model (or one of its submodules) is already in target space."""


class NotConvertedError(TargetSpaceError, ValueError):
    """``to_weight_space`` was called on a model with nothing in target space."""


class LayerReusedError(TargetSpaceError, RuntimeError):
    """A converted layer runs more than once per forward pass (tied or shared weights).

    Its input on the reference batch is then not one matrix A, so ``W = T A^‡`` is undefined.
    """


class UnsupportedLayerError(TargetSpaceError, TypeError):
    """A selected layer is of a kind whose weights cannot be solved from targets (for example a Conv
    subclass that transforms its weight before use, or an LSTM)."""


class UnsupportedHabitError(TargetSpaceError, RuntimeError):
    """A PyTorch habit that cannot work on a converted model (``torch.jit.trace``, ``torch.export``); the
    message says what to use instead."""


class FunctionalWeightUseError(TargetSpaceError, RuntimeError):
    """A converted layer's weight was read during the reference pass before the layer itself ran,
    i.e. it is used functionally (``F.linear(x, layer.weight)``) outside the module's forward."""


class SolveError(TargetSpaceError, FloatingPointError):
    """Realisation met a non-finite value (in a layer's input, its Gram, or the solved weights)."""


class AssignmentError(TargetSpaceError, NotImplementedError):
    """The weight of a target-space layer was assigned. Weights are computed from targets."""


class NotTraceableError(TargetSpaceError, RuntimeError):
    """torch.fx could not trace the model (raised only when tracing is required)."""


class ShardError(TargetSpaceError, RuntimeError):
    """A sharded conversion (``process_group``) cannot go ahead: the ranks disagree (options, weights, the
    shape of their reference shards), a shard is empty, a rank did not join a check in time, or the model
    has a part that cannot be solved from shards. Raised on every rank alike, before anything changes."""


class TargetSpaceWarning(UserWarning):
    """Base class of the library's warnings: ``warnings.simplefilter("error", tp.TargetSpaceWarning)`` (or
    ``pytest -W error::target_param.TargetSpaceWarning``) turns every one of them into an error."""


class WeightSpaceWarning(TargetSpaceWarning):
    """A linear map stays in weight space (named, with the reason): a bare tensor used in a way eq. 6 cannot
    solve, or a layer that did not run on the reference batch."""


class RankDeficientWarning(TargetSpaceWarning):
    """A layer has fewer reference columns than input rows: ``n̄ × positions < d_in + 1``
    (section 3.1, Fig. 7), so not every target is achievable."""


class IllConditionedWarning(TargetSpaceWarning):
    """A Cholesky factorisation failed and was retried in float64 and/or with jitter."""


class TraceFallbackWarning(TargetSpaceWarning):
    """torch.fx planning failed or disagreed with eager; the execution order recorded by hooks is used."""


class LambdaScaleWarning(TargetSpaceWarning):
    """λ is large against the scale of a layer's input: ``λ_j`` exceeds ``LAMBDA_SCALE_THRESHOLD`` (0.1, in
    ``target_param.plan``) of the mean diagonal of its Gram ``A_j A_jᵀ`` on the reference batch, over the
    input rows (``Σ|A_j|² / d_in``; the ones row of the bias left out; a grouped conv over all its groups).
    The ridge then shrinks the layer's weights and the cascade of solves can collapse;
    ``lam_mode="relative"`` sets each λ_j on its layer's scale."""
