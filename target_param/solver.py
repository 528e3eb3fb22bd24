"""The ridge solve of eq. 6-7, batched, by Cholesky through ``torch.linalg``.

The paper keeps patterns in columns: ``W = T A^‡`` with ``A^‡ = Aᵀ(AAᵀ + λI)⁻¹``. PyTorch keeps patterns
in rows, so this module works with ``X = Aᵀ`` (N × d) and ``Y = Tᵀ`` (N × o) and returns ``Wᵀ`` (d × o):

    primal  (eq. 7):   Wᵀ = (XᵀX + λI)⁻¹ XᵀY          Gram d × d
    dual    (eq. 23):  Wᵀ = Xᵀ (XXᵀ + λI)⁻¹ Y          Gram N × N

Both are the same matrix (Woodbury); the smaller Gram is factorised. λ is absolute and applies to the
unnormalised Gram, every row included (the bias row too). Everything is differentiable by autograd, so
the gradient that reaches the targets is exactly Algorithm 3.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .errors import IllConditionedWarning, SolveError

__all__ = ["ridge_solve", "solve_dtype", "uses_dual", "factor_gram", "solve_with", "ridge_autograd", "plain_autograd"]


def solve_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32 and at least the model's dtype (a float64 model solves in float64)."""
    return torch.promote_types(dtype, torch.float32)


def uses_dual(rows: int, cols: int) -> bool:
    """Whether the N × N Gram (eq. 23) is smaller than the d × d one; ``rows`` = d, ``cols`` = N."""
    return cols < rows


def factor_gram(gram: Tensor, lam: float, layer: str) -> Tensor:
    """Cholesky factor of ``gram + λI``. On failure retry in float64, then with growing jitter."""
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    k = gram + lam * eye if lam else gram
    factor, info = torch.linalg.cholesky_ex(k)
    if not bool(info.any()):
        return factor
    if not bool(torch.isfinite(gram).all()):
        raise SolveError(
            f"Layer '{layer}': the Gram matrix of its input on the reference batch is not finite.",
            "A NaN/Inf reached this layer during realisation; check the targets and the layers before it.",
            layer=layer,
        )
    k64 = k.double()
    scale = k64.diagonal(dim1=-2, dim2=-1).abs().amax(-1, keepdim=True).clamp_min(1e-6)  # a zero Gram too
    jitter = 0.0
    for attempt in range(8):
        trial = k64 + (jitter * scale)[..., None] * torch.eye(k.shape[-1], dtype=torch.float64, device=k.device)
        factor, info = torch.linalg.cholesky_ex(trial)
        if not bool(info.any()):
            with torch.no_grad():
                ev = torch.linalg.eigvalsh(k64)
                cond = (ev.abs().amax(-1) / ev.abs().amin(-1).clamp_min(1e-300)).max().item()
            warnings.warn(
                f"Layer '{layer}': Cholesky of AAᵀ + λI failed in {str(gram.dtype).removeprefix('torch.')}; "
                f"solved in float64{' with relative jitter %.0e' % jitter if jitter else ''}. "
                "Increase lam or the reference batch to make the solve well conditioned.\n"
                f"lam: {lam}\ncondition estimate: {cond:.3g}",
                IllConditionedWarning,
                stacklevel=4,
            )
            return factor
        jitter = 1e-12 if jitter == 0.0 else jitter * 100
    raise SolveError(
        f"Layer '{layer}': AAᵀ + λI is not positive definite, even in float64 with jitter.",
        "Use lam > 0.",
        layer=layer,
        lam=lam,
    )


def solve_with(rhs: Tensor, factor: Tensor) -> Tensor:
    """``K⁻¹ rhs`` from the Cholesky factor of K (which may be float64 after a retry)."""
    return torch.cholesky_solve(rhs.to(factor.dtype), factor).to(rhs.dtype)


def ridge_autograd(x: Tensor, y: Tensor, lam: float, layer: str) -> Tensor:
    """Eq. 7 / eq. 23 with plain autograd through Gram and Cholesky (the reference for double backward)."""
    xt = x.mT
    if uses_dual(x.shape[-1], x.shape[-2]):
        return xt @ solve_with(y, factor_gram(x @ xt, lam, layer))
    return solve_with(xt @ y, factor_gram(xt @ x, lam, layer))


def plain_autograd() -> bool:
    """Under torch.func transforms (vmap/jvp/grad) the custom Functions defer to plain autograd."""
    return torch._C._are_functorch_transforms_active()


class _Ridge(torch.autograd.Function):
    """The ridge solve with the analytic backward of Algorithm 3 (row layout, per group).

    With ``K`` the factorised Gram, ``W = K⁻¹XᵀY`` (primal) or ``W = XᵀK⁻¹Y`` (dual), ``S = XW`` and
    ``Z = (XᵀX + λI)⁻¹ Ŵ``:

        dL/dY = X Z,        dL/dX = (Y − S) Zᵀ − (X Z) Wᵀ

    i.e. the paper's ``∂L/∂T = Ḡ A`` and ``δA = Ḡᵀ(T − S) − Wᵀ Ḡ A`` with ``Ḡ = Ŵᵀ(AAᵀ + λI)⁻¹``. The dual
    form uses ``X Z = K⁻¹ X Ŵ`` and ``Y − S = λ K⁻¹ Y``. The backward reuses the forward's Cholesky
    factor and needs no Gram-sized product; double backward falls back to autograd through
    ``ridge_autograd``.
    """

    @staticmethod
    def forward(ctx, x, y, lam, layer):
        xt = x.mT
        ctx.dual, ctx.lam, ctx.layer = uses_dual(x.shape[-1], x.shape[-2]), lam, layer
        if ctx.dual:
            factor = factor_gram(x @ xt, lam, layer)
            m = solve_with(y, factor)
            w = xt @ m
            ctx.save_for_backward(x, y, w, factor, m)
        else:
            factor = factor_gram(xt @ x, lam, layer)
            w = solve_with(xt @ y, factor)
            ctx.save_for_backward(x, y, w, factor)
        return w

    @staticmethod
    def backward(ctx, gw):
        x, y, w, factor, *m = ctx.saved_tensors
        need_x, need_y = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # create_graph: differentiate the plain formula instead
            inputs = [t for t, need in ((x, need_x), (y, need_y)) if need]
            grads = iter(torch.autograd.grad(ridge_autograd(x, y, ctx.lam, ctx.layer), inputs, gw,
                                             create_graph=True))
            return (next(grads) if need_x else None), (next(grads) if need_y else None), None, None
        gx = None
        if ctx.dual:
            u = solve_with(x @ gw, factor)  # X Z
            if need_x:
                gx = m[0] @ (gw.mT - u.mT @ x) - u @ w.mT
        else:
            z = solve_with(gw, factor)
            u = x @ z
            if need_x:
                gx = (y - x @ w) @ z.mT - u @ w.mT
        return gx, (u if need_y else None), None, None


def ridge_solve(x: Tensor, y: Tensor, lam: float, layer: str = "?") -> Tensor:
    """``argmin_W ||x W − y||² + λ||W||²`` for each leading (group) index.

    Args:
        x: (G, N, d), the layer's input patterns as rows (with a ones column for the bias), ``Aᵀ``.
        y: (G, N, o), the targets as rows, ``Tᵀ``.
        lam: λ ≥ 0.
        layer: the layer's name, for error messages.

    Returns:
        (G, d, o): ``Wᵀ = (A^‡)ᵀ Tᵀ`` in the dtype ``solve_dtype(x.dtype)``; differentiable in x and y
        (Algorithm 3, by :class:`_Ridge`).
    """
    dtype = solve_dtype(x.dtype)
    x, y = x.to(dtype), y.to(dtype)
    if plain_autograd():
        return ridge_autograd(x, y, lam, layer)
    return _Ridge.apply(x, y, lam, layer)
