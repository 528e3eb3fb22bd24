"""target_param: train any PyTorch model in target space.

Fairbank, Samothrakis and Citi, "Deep Learning in Target Space", JMLR 23 (2022).

    import target_param as tp
    tp.to_target_space(model, ref_batch, lam=0.1)   # in place; the parameters are now the targets
    ...                                             # the training loop does not change
    tp.to_weight_space(model)                       # a plain model again

Modules: ``convert`` (the public verbs), ``realise`` (Algorithm 2, the reference pass), ``solver``
(eq. 6-7 and 23 by Cholesky), ``layers`` (Linear/Conv/ConvTranspose and transformers' Conv1D adapters),
``recurrent`` (nn.RNN, Algorithm 5), ``adapters`` (which adapter solves a module), ``functional`` (weights used
through F.linear / F.conv* outside their module, and bare Parameters such as nn.MultiheadAttention's
projections), ``plan`` (torch.fx planning and ``explain``), ``parametrization`` (the torch.nn.utils.parametrize
hook-up), ``registry`` (where a converted root keeps its engine), ``recompute`` (weight reads inside a
backward, and checkpoint calls inside the reference pass: activation checkpointing), ``randomness`` (the
reference pass's own random stream), ``norms`` (running statistics during a pass), ``distributed`` (the
reference batch sharded across the ranks of a process group: ``to_target_space(..., process_group=)``),
``benchmark`` (``tp.benchmark`` and ``python -m target_param.benchmark``: the cost ratio for any model),
``checkpoints`` (``weight_space_state_dict``), ``errors`` (named exceptions and warnings).
"""
from .checkpoints import weight_space_state_dict
from .convert import explain, is_target_space, realisations, to_target_space, to_weight_space
from .distributed import gather_state_dict
from .errors import *  # noqa: F401,F403
from .errors import __all__ as _errors

__all__ = ["to_target_space", "to_weight_space", "is_target_space", "explain", "realisations", "gather_state_dict",
           "weight_space_state_dict",
           "benchmark", *_errors]


def __getattr__(name):
    # tp.benchmark, imported on first use: `python -m target_param.benchmark` then runs the module once
    if name == "benchmark":
        from .benchmark import benchmark

        globals()["benchmark"] = benchmark
        return benchmark
    raise AttributeError(f"module 'target_param' has no attribute '{name}'")
__version__ = "0.1.0"
