"""Layer adapters: what the realisation engine needs to know about each kind of layer.

Every adapter answers the same questions for its module:

    tensors                 the parametrized tensor names (``weight``, ``bias``; for nn.RNN all flat weights)
    targets                 those whose ``parametrizations[name].original`` holds a target T
    sums(m, args, out)      the sums S on the reference batch with the current weights (T = S: eq. 13)
    realise(m, args, T, λ)  every tensor of ``tensors`` solved from the targets (eq. 6; Algorithm 5)
    optimistic(m, out, T)   what the layer passes on under OCU (eq. 8, eq. 21)
    problems(sums)          the (rows, columns, groups) of each least-squares problem, for ``explain``

Linear and Conv layers work in row layout (patterns are rows, see ``solver``), batched over groups:

    patches(x)     (G, N, d)  the layer input on the reference batch, ``A[0:j)ᵀ`` without the ones row
    rows(t)        (G, N, o)  the target (or the layer output), ``T_jᵀ``
    assemble(wt)   (weight, bias) from ``Wᵀ`` of shape (G, d [+1], o)

For a convolution A is the im2col patch matrix (section 4.2): ``k·C_in/G`` rows and ``n̄ × positions``
columns per group; each group of a grouped conv is an independent problem. Recurrent layers live in
``recurrent``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ReferenceBatchError
from .solver import factor_gram, plain_autograd, ridge_autograd, ridge_solve, solve_dtype, solve_with, uses_dual

__all__ = ["Adapter", "FeedForwardAdapter", "LinearAdapter", "ConvAdapter", "adapter_for", "is_candidate",
           "SUPPORTED", "CANDIDATES"]

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.RNN)
# Also offered to filter_fn, so that the user hears why they are refused.
CANDIDATES = SUPPORTED + (nn.RNNBase, nn.RNNCellBase)


class Adapter:
    """Interface of every adapter (see the module docstring)."""

    tensors: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()

    def sums(self, module: nn.Module, args: tuple, output) -> dict[str, Tensor]:
        raise NotImplementedError

    def realise(self, module: nn.Module, args: tuple, targets: dict, lam: float, name: str,
                optimistic: bool) -> dict[str, Tensor]:
        raise NotImplementedError

    def optimistic(self, module: nn.Module, output, targets: dict):
        raise NotImplementedError

    def problems(self, sums: dict[str, Tensor]) -> list[tuple[int, int, int, int]]:
        """(rows of A incl. the ones row, columns, groups, outputs per group) of each solve."""
        raise NotImplementedError


class FeedForwardAdapter(Adapter):
    """Linear and Conv: one target, the layer's output on the reference batch."""

    groups = 1
    targets = ("weight",)

    def __init__(self, module: nn.Module):
        self.has_bias = module.bias is not None
        self.out_features = module.weight.shape[0]
        self.tensors = ("weight", "bias") if self.has_bias else ("weight",)

    def sums(self, module, args, output):
        return {"weight": output}

    def realise(self, module, args, targets, lam, name, optimistic):
        """``W[0:j] = T_j A[0:j)^‡`` (eq. 6) from the layer's input ``args[0]`` on the reference batch."""
        t = targets["weight"]
        a = self.patches(args[0])
        if self.has_bias:
            a = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)
        y = self.rows(t)
        if y.shape[-2] != a.shape[-2]:
            raise ReferenceBatchError(
                f"Layer '{name}': its input on the reference batch has {a.shape[-2]} columns "
                f"(n̄ × positions) but its target has {y.shape[-2]}.",
                "The targets and the reference batch must come from the same conversion; reconvert, or load "
                "a state_dict saved with the same reference batch size.",
                layer=name,
                target_shape=tuple(t.shape),
                input_shape=tuple(args[0].shape),
            )
        w, b = self.assemble(ridge_solve(a, y, lam, name), t.dtype)
        return {"weight": w, "bias": b} if self.has_bias else {"weight": w}

    def optimistic(self, module, output, targets):
        return targets["weight"].clone()

    def problems(self, sums):
        cols = sums["weight"].numel() // self.out_features
        return [(self.in_rows(), cols, self.groups, self.out_features // self.groups)]

    def in_rows(self) -> int:
        """d_in (+1 for the bias) per group: the rows of A."""
        raise NotImplementedError

    def patches(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def rows(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def assemble(self, wt: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
        """Weight and bias, in ``dtype``, from ``Wᵀ`` (G, d [+1], o); the bias sits in the last row."""
        w = wt.mT.to(dtype)  # (G, o, d [+1])
        bias = w[..., -1].reshape(-1).contiguous() if self.has_bias else None
        if self.has_bias:
            w = w[..., :-1]
        return w.reshape(self.weight_shape).contiguous(), bias


class LinearAdapter(FeedForwardAdapter):
    """``nn.Linear`` on inputs (..., d): every leading index is a column of A."""

    kind = "Linear"

    def __init__(self, module: nn.Linear):
        super().__init__(module)
        self.in_features = module.in_features
        self.weight_shape = (module.out_features, module.in_features)

    def in_rows(self) -> int:
        return self.in_features + self.has_bias

    def patches(self, x):
        return x.reshape(1, -1, self.in_features)

    def rows(self, t):
        return t.reshape(1, -1, self.out_features)


class ConvAdapter(FeedForwardAdapter):
    """``nn.Conv1d/2d/3d`` with any stride, padding (every padding_mode, "same"), dilation and groups."""

    def __init__(self, module: nn.modules.conv._ConvNd):
        super().__init__(module)
        self.kind = type(module).__name__
        self.nd = len(module.kernel_size)
        self.groups = module.groups
        self.kernel_size = tuple(module.kernel_size)
        self.stride = tuple(module.stride)
        self.dilation = tuple(module.dilation)
        self.padding_mode = module.padding_mode
        self.pad = tuple(module._reversed_padding_repeated_twice)
        self.in_per_group = module.in_channels // module.groups
        self.weight_shape = tuple(module.weight.shape)

    def in_rows(self) -> int:
        return self.in_per_group * math.prod(self.kernel_size) + self.has_bias

    def pad_input(self, x: Tensor) -> Tensor:
        if any(self.pad):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self.pad, mode=mode)
        return x

    def patches(self, x):
        return self.patches_padded(self.pad_input(x))

    def patches_padded(self, x):
        """im2col by strided views: (G, n̄ × positions, C_in/G × k), columns ordered like the weight."""
        for i, (k, s, d) in enumerate(zip(self.kernel_size, self.stride, self.dilation)):
            x = x.unfold(2 + i, d * (k - 1) + 1, s)[..., ::d]
        n, nd, g = x.shape[0], self.nd, self.groups
        positions = x.shape[2 : 2 + nd]
        # (n, C, P..., K...) -> (G, n, P..., C/G, K...)
        x = x.reshape(n, g, self.in_per_group, *positions, *self.kernel_size)
        perm = [1, 0, *range(3, 3 + nd), 2, *range(3 + nd, 3 + 2 * nd)]
        return x.permute(perm).reshape(g, -1, self.in_per_group * math.prod(self.kernel_size))

    def realise(self, module, args, targets, lam, name, optimistic):
        t = targets["weight"]
        cols = t.numel() // self.out_features
        if plain_autograd() or uses_dual(self.in_rows(), cols) or t.shape[0] != args[0].shape[0]:
            return super().realise(module, args, targets, lam, name, optimistic)
        dtype = solve_dtype(t.dtype)
        xp = self.pad_input(args[0]).to(dtype)
        w, b = self.assemble(_ConvRidge.apply(xp, t.to(dtype), self, lam, name), t.dtype)
        return {"weight": w, "bias": b} if self.has_bias else {"weight": w}

    # conv-shaped products: T·Aᵀ is a conv weight-gradient, X·Z a conv, and the patch-space gradient
    # folded back onto the input a transposed conv, so only the Gram needs the im2col matrix.
    def conv(self, x, wt):
        w, b = self.assemble(wt, wt.dtype)
        return _CONV[self.nd](x, w, b, self.stride, 0, self.dilation, self.groups)

    def cross(self, x, t):
        """``XᵀY`` (G, d [+1], o) without im2col: the conv weight-gradient of x for grad-output t."""
        xy = _CONV_WEIGHT[self.nd](x, self.weight_shape, t, self.stride, 0, self.dilation, self.groups)
        xy = xy.reshape(self.groups, self.out_features // self.groups, -1).mT
        if self.has_bias:
            tb = t.sum([0, *range(2, t.dim())]).reshape(self.groups, 1, -1)
            xy = torch.cat([xy, tb], 1)
        return xy

    def fold(self, shape, wt, grad):
        """col2im of ``grad · wᵀ`` (patch-space gradient) onto the padded input: a transposed conv."""
        w, _ = self.assemble(wt, wt.dtype)
        return _CONV_INPUT[self.nd](shape, w, grad, self.stride, 0, self.dilation, self.groups)

    def rows(self, t):
        n, g = t.shape[0], self.groups
        return t.reshape(n, g, self.out_features // g, -1).permute(1, 0, 3, 2).reshape(g, -1, self.out_features // g)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_WEIGHT = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}
_CONV_INPUT = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input, 3: torch.nn.grad.conv3d_input}


class _ConvRidge(torch.autograd.Function):
    """Eq. 7 for a conv layer (primal form), with the backward of ``solver._Ridge`` in conv form.

    Forward: ``K = XᵀX + λI`` from the im2col matrix (freed right away), ``XᵀY`` as a conv weight-gradient,
    ``W = K⁻¹XᵀY``. Backward, with ``Z = K⁻¹Ŵ``: ``dL/dT = X Z`` is a conv of the input with kernel Z, and
    ``dL/dX = (Y − S)Zᵀ − (XZ)Wᵀ`` folded onto the input is two transposed convs (``S`` a conv with W).
    """

    @staticmethod
    def forward(ctx, xp, t, ad, lam, layer):
        a = ad.patches_padded(xp)
        gram = a.mT @ a
        if ad.has_bias:
            s = a.sum(1)
            corner = torch.full((ad.groups, 1, 1), a.shape[1], dtype=a.dtype, device=a.device)
            gram = torch.cat([torch.cat([gram, s[..., None]], 2), torch.cat([s[:, None], corner], 2)], 1)
        del a
        factor = factor_gram(gram, lam, layer)
        w = solve_with(ad.cross(xp, t), factor)
        ctx.ad, ctx.lam, ctx.layer = ad, lam, layer
        ctx.save_for_backward(xp, t, w, factor)
        return w

    @staticmethod
    def backward(ctx, gw):
        xp, t, w, factor = ctx.saved_tensors
        ad = ctx.ad
        need_x, need_t = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # create_graph: differentiate the plain im2col formula instead
            a = ad.patches_padded(xp)
            if ad.has_bias:
                a = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], -1)
            inputs = [v for v, need in ((xp, need_x), (t, need_t)) if need]
            grads = iter(torch.autograd.grad(ridge_autograd(a, ad.rows(t), ctx.lam, ctx.layer), inputs, gw,
                                             create_graph=True))
            return (next(grads) if need_x else None), (next(grads) if need_t else None), None, None, None
        z = solve_with(gw, factor)
        xz = ad.conv(xp, z)  # dL/dT
        gx = None
        if need_x:
            gx = ad.fold(xp.shape, z, t - ad.conv(xp, w)) - ad.fold(xp.shape, w, xz)
        return gx, (xz if need_t else None), None, None, None


def _plain(module: nn.Module) -> bool:
    """True when the module computes with its weight exactly as its torch base class does."""
    if type(module) in (nn.LSTM, nn.GRU) or isinstance(module, nn.RNNCellBase):
        return False
    for base in SUPPORTED:
        if isinstance(module, base):
            cls = type(module)
            same_forward = cls.forward is base.forward or _is_plain_linear_forward(cls)
            same_conv = not hasattr(base, "_conv_forward") or cls._conv_forward is base._conv_forward
            return same_forward and same_conv
    return False


def _is_plain_linear_forward(cls) -> bool:
    # timm.layers.Linear re-implements Linear.forward as F.linear(x, weight, bias) (for torchscript).
    return cls.__module__.startswith("timm.layers") and cls.__name__ == "Linear"


def is_candidate(module: nn.Module) -> bool:
    """Linear/Conv/recurrent modules (subclasses included) that a user may want converted."""
    return isinstance(module, CANDIDATES)


def adapter_for(module: nn.Module) -> Adapter | None:
    """The adapter of a convertible layer, or None when its class changes how the weight is used."""
    if not _plain(module):
        return None
    if isinstance(module, nn.Linear):
        return LinearAdapter(module)
    if isinstance(module, nn.RNN):
        from .recurrent import RNNAdapter

        return RNNAdapter(module)
    return ConvAdapter(module)
