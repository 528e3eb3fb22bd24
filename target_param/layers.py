"""Layer adapters: what the realisation engine needs to know about each kind of layer.

Every adapter answers the same questions for its module:

    tensors                 the parametrized tensor names (``weight``, ``bias``; for nn.RNN all flat weights)
    targets                 those whose ``parametrizations[name].original`` holds a target T
    sums(m, args, out)      the sums S on the reference batch with the current weights (T = S: eq. 13)
    realise(m, args, T, solves)
                            every tensor of ``tensors`` solved from the targets (eq. 6; Algorithm 5), and
                            the layer's output on the reference batch when the solve gives it (else None)
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

import inspect
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ReferenceBatchError
from .gram import shift_gram
from .solver import (FactorCache, Solves, full_precision, handed_out, plain_autograd, regrad, ridge_autograd,
                     ridge_solve, solve_dtype, solve_with, still_unchanged, unsharded, with_ones)

__all__ = ["Adapter", "FeedForwardAdapter", "LinearAdapter", "TransposedLinearAdapter", "ConvAdapter",
           "ConvTransposeAdapter", "positional"]



class Adapter:
    """Interface of every adapter (see the module docstring)."""

    tensors: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()

    def sums(self, module: nn.Module, args: tuple, output) -> dict[str, Tensor]:
        raise NotImplementedError

    def realise(self, module: nn.Module, args: tuple, targets: dict, solves: Solves, name: str,
                optimistic: bool) -> tuple[dict[str, Tensor], object]:
        raise NotImplementedError

    def optimistic(self, module: nn.Module, output, targets: dict):
        raise NotImplementedError

    def problems(self, sums: dict[str, Tensor]) -> list[tuple[int, int, int, int]]:
        """(rows of A incl. the ones row, columns, groups, outputs per group) of each solve."""
        raise NotImplementedError

    def column_energy(self, module: nn.Module, args: tuple, output, sums: dict[str, Tensor]
                      ) -> dict[str, tuple[Tensor, int]]:
        """Per solve, by target name: the squared norm of each column of its A over the input rows (the ones
        row of the bias left out), shaped (columns, groups), and the rows of A with the ones row. The mean
        diagonal of the Gram ``A Aᵀ`` over all groups is then ``(Σ + columns·groups·bias) / (groups·rows)``
        (``plan.PlannedLayer.mean_diagonals``). ``args``/``output``: the layer's call on the reference batch,
        ``sums``: what ``sums`` returned for it."""
        raise NotImplementedError

    def target_layout(self, t: Tensor) -> Tensor:
        """A new target, in the memory layout the layer's solve prefers (see ``ConvAdapter``)."""
        return t


class FeedForwardAdapter(Adapter):
    """Linear and Conv: one target, the layer's output on the reference batch."""

    groups = 1
    targets = ("weight",)
    split = False  # ridge_solve returns nn.Linear's (weight, bias) instead of Wᵀ

    def __init__(self, module: nn.Module):
        self.has_bias = module.bias is not None
        self.out_features = module.weight.shape[0]
        self.tensors = ("weight", "bias") if self.has_bias else ("weight",)
        self.cache = FactorCache()

    def sums(self, module, args, output):
        return {"weight": output}

    def realise(self, module, args, targets, solves, name, optimistic):
        """``W[0:j] = T_j A[0:j)^‡`` (eq. 6) from the layer's input ``args[0]`` on the reference batch, and
        the sums ``S_j = W[0:j] A[0:j)`` it achieves, which the layer passes on (Algorithm 2)."""
        t = targets["weight"]
        a = self.patches(args[0])
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
        wt, s = ridge_solve(a, y, solves, name, self.cache, ones=self.has_bias, fixed=solves.is_fixed(args[0]),
                            split=self.split)
        s = self.unrows(s, t)
        return self.tensors_of(wt, t.dtype), (s if s.dtype == t.dtype else s.to(t.dtype))

    def stored_shape(self, which: str) -> tuple:
        """The shape of the layer's ``weight`` or ``bias``."""
        return tuple(self.weight_shape) if which == "weight" else (self.out_features,)

    def with_ones(self, a: Tensor) -> Tensor:
        """The patches (G, N, d) with the row of ones of eq. 2a appended when the layer has a bias."""
        return with_ones(a) if self.has_bias else a

    def tensors_of(self, wt: Tensor, dtype: torch.dtype) -> dict[str, Tensor]:
        w, b = self.assemble(wt, dtype)
        return {"weight": w, "bias": b} if self.has_bias else {"weight": w}

    def optimistic(self, module, output, targets):
        return targets["weight"].clone()

    def problems(self, sums):
        cols = sums["weight"].numel() // self.out_features
        return [(self.in_rows(), cols, self.groups, self.out_features // self.groups)]

    def in_rows(self) -> int:
        """d_in (+1 for the bias) per group: the rows of A."""
        raise NotImplementedError

    def column_energy(self, module, args, output, sums):
        return {"weight": (self.energy(args[0]), self.in_rows())}

    def patches(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def rows(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def unrows(self, s: Tensor, like: Tensor) -> Tensor:
        """The inverse of ``rows``: S (G, N, o) back in the layout of the target ``like``."""
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

    def energy(self, x: Tensor) -> Tensor:
        """|column|² of A (without the ones row), (N, 1): every leading index of x is a column."""
        return x.to(solve_dtype(x.dtype)).square().sum(-1).reshape(-1, 1)

    def patches(self, x):
        """(N, d): one problem (no group index), without a reshape when the input is a matrix already."""
        return x if x.dim() == 2 else x.reshape(-1, self.in_features)

    def rows(self, t):
        return t if t.dim() == 2 else t.reshape(-1, self.out_features)

    def unrows(self, s, like):
        return s if s.shape == like.shape else s.reshape(like.shape)

    split = True

    def assemble(self, wt, dtype):
        """nn.Linear's weight (o, d) and bias (o,), as ``ridge_solve`` returns them with ``split``."""
        w, b = wt
        return (w if w.dtype == dtype else w.to(dtype)), (b if b is None or b.dtype == dtype else b.to(dtype))


class TransposedLinearAdapter(LinearAdapter):
    """A Linear whose weight is stored transposed, (d_in, d_out): Hugging Face transformers' ``Conv1D``
    (GPT-2 and its kin), whose forward is ``torch.addmm(bias, x, W)``. Solved as a Linear; the realised weight
    is handed out as the transposed view of the solved ``W[0:j]``."""

    kind = "Conv1D"

    def __init__(self, module: nn.Module):
        FeedForwardAdapter.__init__(self, module)
        self.in_features, self.out_features = module.weight.shape
        self.weight_shape = tuple(module.weight.shape)

    def assemble(self, wt, dtype):
        w, b = super().assemble(wt, dtype)
        return w.mT, b


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
        # Zero padding, symmetric: the conv-shaped products pad by themselves and nothing padded is kept.
        self.native = self.padding_mode == "zeros" and self.pad[0::2] == self.pad[1::2]
        self.conv_padding = tuple(self.pad[0::2][::-1]) if self.native else 0
        self.subset = False  # approximate: solved on a fixed subset of patch columns (see choose_positions)

    # ------------------------------------------------ the approximate option (section 4.2, max_positions)
    def choose_positions(self, out: Tensor, max_positions: int) -> Tensor | None:
        """A fixed random subset of ``max_positions`` of the n̄ × positions patch columns, or None when
        there are no more columns than that (the layer stays exact)."""
        cols = out.numel() // self.out_features
        if cols <= max_positions:
            return None
        self.subset = True
        return torch.randperm(cols)[:max_positions].sort().values.to(out.device)

    def at_positions(self, out: Tensor, positions: Tensor) -> Tensor:
        """The layer output (n, C_out, P...) at the chosen columns: (M, C_out), the shape of its target."""
        return out.reshape(out.shape[0], self.out_features, -1).mT.reshape(-1, self.out_features)[positions]

    def patches_at(self, x: Tensor, positions: Tensor) -> Tensor:
        """The im2col columns ``positions`` only, (G, M, d), gathered by flat index from the padded input,
        so that their backward scatters into an input-sized gradient (not a k-times larger patch view)."""
        xp = self.pad_input(x)
        c, sizes = xp.shape[1], xp.shape[2:]
        grid = [(p - d * (k - 1) - 1) // s + 1
                for p, k, s, d in zip(sizes, self.kernel_size, self.stride, self.dilation)]
        image, flat = positions // math.prod(grid), positions % math.prod(grid)
        strides = [math.prod(sizes[i + 1:]) for i in range(self.nd)]  # of the padded spatial dims
        spatial = 0
        for i, (u, k, s, d) in enumerate(zip(torch.unravel_index(flat, grid), self.kernel_size, self.stride,
                                            self.dilation)):
            shape = [1] * self.nd
            shape[i] = k
            offsets = (torch.arange(k, device=x.device) * d).reshape(shape)
            spatial = spatial + (u.reshape(-1, *[1] * self.nd) * s + offsets) * strides[i]  # (M, K...)
        channel = torch.arange(c, device=x.device).reshape(1, c, *[1] * self.nd)
        image = image.reshape(-1, 1, *[1] * self.nd)
        if self.nd == 2 and not xp.is_contiguous() and xp.is_contiguous(memory_format=torch.channels_last):
            source = xp.permute(0, 2, 3, 1).reshape(-1)  # channels_last storage, (n, h, w, C), as it lies
            index = (image * math.prod(sizes) + spatial[:, None]) * c + channel  # (M, C, K...)
        else:
            source = xp.reshape(-1)
            index = (image * c + channel) * math.prod(sizes) + spatial[:, None]  # (M, C, K...)
        # index_select, whose backward is index_add: 3.6-4.7 times faster (forward and backward) than
        # advanced indexing, whose backward is an accumulating index_put (the CIFAR net's sizes, 1 thread)
        flat = source.index_select(0, index.reshape(-1))
        return flat.reshape(len(positions), self.groups, -1).transpose(0, 1)

    def positions(self, module: nn.Module) -> Tensor:
        return module.parametrizations["weight"][0].positions

    def sums(self, module, args, output):
        if self.subset:
            return {"weight": self.at_positions(output, self.positions(module))}
        return {"weight": output}

    def problems(self, sums):
        if self.subset:
            return [(self.in_rows(), sums["weight"].shape[0], self.groups, self.out_features // self.groups)]
        return super().problems(sums)

    def realise_subset(self, module, args, targets, solves, name):
        """Eq. 6 on the chosen columns only; the layer then computes its full output with that W."""
        t = targets["weight"]
        dtype = solve_dtype(t.dtype)
        x = args[0].to(dtype)
        if self.nd == 2 and x.device.type in CHANNELS_LAST_DEVICES and _channels_last_safe(x):  # fastest layout
            x = x.contiguous(memory_format=torch.channels_last)  # (a no-op after the first such layer)
        a = self.patches_at(x, self.positions(module))
        y = t.to(dtype).reshape(t.shape[0], self.groups, -1).transpose(0, 1)
        wt, _ = ridge_solve(a, y, solves, name, self.cache, sums=False, ones=self.has_bias)
        out = self.conv(x if self.native else self.pad_input(x), wt)
        return self.tensors_of(wt, t.dtype), out.to(t.dtype)

    def in_rows(self) -> int:
        return self.in_per_group * math.prod(self.kernel_size) + self.has_bias

    def energy(self, x: Tensor) -> Tensor:
        """|column|² of each group's im2col matrix (without the ones row), (n̄ × positions, G), columns ordered
        as ``patches`` orders them, without building im2col: the per-group channel sum of x² (padded as the
        layer pads), convolved with a ones kernel at the layer's stride and dilation."""
        x = x.to(solve_dtype(x.dtype))
        if x.dim() == self.nd + 1:  # an unbatched call
            x = x[None]
        sq = self.pad_input(x).square()
        n, g = sq.shape[0], self.groups
        sq = sq.reshape(n, g, self.in_per_group, *sq.shape[2:]).sum(2)  # (n, G, spatial...)
        ones = sq.new_ones(g, 1, *self.kernel_size)
        e = _CONV[self.nd](sq, ones, None, self.stride, 0, self.dilation, g)  # (n, G, positions...)
        return e.reshape(n, g, -1).mT.reshape(-1, g)

    def target_layout(self, t: Tensor) -> Tensor:
        """A new target in the layout its products run fastest in: channels_last for 2-D convs on
        ``CHANNELS_LAST_DEVICES``. The reference pass follows the targets' layout (``realise``), so the
        conv-shaped products, their outputs and the targets' gradients all share it."""
        if self.nd == 2 and not self.subset and t.dim() == 4 and t.device.type in CHANNELS_LAST_DEVICES:
            return t.contiguous(memory_format=torch.channels_last)
        return t

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

    def gram_of(self, x: Tensor) -> Tensor:
        """``XᵀX`` (G, d [+1], d [+1]) of the layer's patches, with the ones row for the bias; ``x`` is the
        input as the conv-shaped products see it (unpadded when ``native``, else padded).

        Stride-1 1-D/2-D convs use the shift structure of overlapping patches (paper footnote 3, see
        ``gram.shift_gram``); with native zero padding the padding is never materialised. Other convs build
        the im2col matrix."""
        zero = self.pad if self.native else (0,) * len(self.pad)  # (left, right[, top, bottom])
        sizes = [p + zero[2 * i] + zero[2 * i + 1] for i, p in enumerate(reversed(x.shape[2:]))][::-1]
        out = [p - d * (k - 1) for p, d, k in zip(sizes, self.dilation, self.kernel_size)]
        if any(s != 1 for s in self.stride) or self.nd > 2 or min(out) < _SHIFT_GRAM_MIN:
            a = self.patches_padded(self.pad_input(x) if self.native else x)
            gram = a.mT @ a
            sums = a.sum(1)
        else:
            gram, sums = shift_gram(x if self.nd == 2 else x[:, :, None], self.groups,
                                    (1,) * (2 - self.nd) + self.kernel_size, (1,) * (2 - self.nd) + self.dilation,
                                    (tuple(zero[2:4]) or (0, 0)) + tuple(zero[0:2]))
        if not self.has_bias:
            return gram
        n = x.shape[0] * math.prod((p - d * (k - 1) - 1) // s + 1
                                   for p, d, k, s in zip(sizes, self.dilation, self.kernel_size, self.stride))
        corner = torch.full((self.groups, 1, 1), float(n), dtype=x.dtype, device=x.device)
        return torch.cat([torch.cat([gram, sums[..., None]], 2), torch.cat([sums[:, None], corner], 2)], 1)

    def realise(self, module, args, targets, solves, name, optimistic):
        if self.subset:
            return self.realise_subset(module, args, targets, solves, name)
        t = targets["weight"]
        cols = t.numel() // self.out_features
        if plain_autograd() or solves.dual(self.in_rows(), cols) or t.shape[0] != args[0].shape[0]:
            return super().realise(module, args, targets, solves, name, optimistic)
        out_dtype = t.dtype
        dtype = solve_dtype(out_dtype)
        x, t = args[0].to(dtype), t.to(dtype)
        if self.nd == 2 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last) \
                and _channels_last_safe(x):
            x = x.contiguous(memory_format=torch.channels_last)  # the targets' layout (see target_layout)
        wt, s = _ConvRidge.apply(x if self.native else self.pad_input(x), t, self, solves, name)
        return self.tensors_of(wt, out_dtype), s.to(out_dtype)

    # conv-shaped products: T·Aᵀ is a conv weight-gradient, X·Z a conv, and the patch-space gradient
    # folded back onto the input a transposed conv, so only the Gram needs the im2col matrix. ``x`` is the
    # input as the layer sees it when ``native`` (the products pad), else already padded.
    def conv(self, x, wt):
        w, b = self.assemble(wt, wt.dtype)
        return _CONV[self.nd](x, w, b, self.stride, self.conv_padding, self.dilation, self.groups)

    def patches_of(self, x):
        return self.patches(x) if self.native else self.patches_padded(x)

    def cross(self, x, t):
        """``XᵀY`` (G, d [+1], o) without im2col: the conv weight-gradient of x for grad-output t."""
        xy = _CONV_WEIGHT[self.nd](x, self.weight_shape, t, self.stride, self.conv_padding, self.dilation,
                                   self.groups)
        xy = xy.reshape(self.groups, self.out_features // self.groups, -1).mT
        if self.has_bias:
            tb = t.sum([0, *range(2, t.dim())]).reshape(self.groups, 1, -1)
            xy = torch.cat([xy, tb], 1)
        return xy

    def fold(self, shape, wt, grad):
        """col2im of ``grad · wᵀ`` (patch-space gradient) onto the padded input: a transposed conv, whose
        output padding restores the input size (``F.conv_transpose2d`` is up to 15% faster here than
        ``torch.nn.grad.conv2d_input``, which hands mkldnn an expanded dummy input)."""
        w, _ = self.assemble(wt, wt.dtype)
        pad = (self.conv_padding,) * self.nd if isinstance(self.conv_padding, int) else self.conv_padding
        extra = [size - ((o - 1) * s - 2 * p + d * (k - 1) + 1) for size, o, s, p, d, k in
                 zip(shape[2:], grad.shape[2:], self.stride, pad, self.dilation, self.kernel_size)]
        return _CONV_T[self.nd](grad, w, None, self.stride, pad, extra, self.groups, self.dilation)

    def rows(self, t):
        n, g = t.shape[0], self.groups
        return t.reshape(n, g, self.out_features // g, -1).permute(1, 0, 3, 2).reshape(g, -1, self.out_features // g)

    def unrows(self, s, like):
        n, g, og = like.shape[0], self.groups, self.out_features // self.groups
        return s.reshape(g, n, -1, og).permute(1, 0, 3, 2).reshape(like.shape)


# Below this many output rows (or columns) the border corrections outweigh the saving: im2col Gram.
# Measured on this project's CPU, 1 thread (100 images, 3×3, C_in channels, "same" zero padding): the shift
# Gram is 6.6× faster than im2col at 32×32×32, 5.6× at 16×16×64, 4.1× at 8×8×128; at 4×4 0.95× for 32
# channels, 1.6× for 64 and 2.0× for 128.
_SHIFT_GRAM_MIN = 4
# New conv targets are channels_last on these devices, and the reference pass's conv products with them
# (mkldnn, 1 thread, the paper's CNN shapes: forward and transposed convs about 20% faster than NCHW,
# the whole target step 5%: 0.954 in 30 interleaved pairs); with max_positions the subset layers' inputs
# (cnn-approx step: 0.949 and 0.925 in 24 A/B pairs). Not measured on CUDA: there it stays NCHW.
CHANNELS_LAST_DEVICES = {"cpu"}
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _channels_last_safe(x: Tensor) -> bool:
    """Whether ``x`` may be made channels_last: not when a spatial dimension is 1 (torch 2.14's CPU conv2d
    crashes the process on a channels_last input of width 1 with a dilated, padded 1×1 kernel; found by
    tests/test_fuzz.py). Such inputs stay NCHW, which the products accept beside channels_last targets."""
    return min(x.shape[2:]) > 1
_CONV_WEIGHT = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class _ConvRidge(torch.autograd.Function):
    """Eq. 7 for a conv layer (primal form) and its sums ``S = conv(X, W)``, with the backward of
    ``solver._Ridge`` in conv form.

    Forward: ``K = XᵀX + λI`` (by shifts for stride-1 convs, see ``ConvAdapter.gram_of``), ``XᵀY`` as a conv
    weight-gradient, ``W = K⁻¹XᵀY``, ``S`` a conv. Backward, with ``Z = K⁻¹(Ŵ + XᵀŜ)`` (``XᵀŜ`` a conv
    weight-gradient): ``dL/dT = X Z`` is a conv of the input with kernel Z, and
    ``dL/dX = (Y − S)Zᵀ + (Ŝ − XZ)Wᵀ`` folded onto the input is two transposed convs.
    """

    @staticmethod
    def forward(ctx, x, t, ad, solves, layer):
        ctx.set_materialize_grads(False)
        b = ad.cross(x, t)
        factor, _, ctx.inverse = solves.factor(lambda: ad.gram_of(x), layer, x, ad.cache, ad.out_features // ad.groups,
                                               b)
        w = solve_with(b, factor, ctx.inverse)
        s = ad.conv(x, w)
        ctx.ad, ctx.lam, ctx.layer, ctx.shards = ad, solves.lam, layer, solves.shards
        ctx.sums_kept = handed_out(s) if ctx.needs_input_grad[0] else None  # S, which may change in place
        ctx.save_for_backward(x, t, w, factor)
        return w, s

    @staticmethod
    @full_precision
    def backward(ctx, gw, gs):
        x, t, w, factor = ctx.saved_tensors
        ad = ctx.ad
        need_x, need_t = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # create_graph: differentiate the plain im2col formula instead
            unsharded(ctx.shards, "double backward (create_graph=True)")
            a = ad.with_ones(ad.patches_of(x))
            inputs = [v for v, need in ((x, need_x), (t, need_t)) if need]
            w2 = ridge_autograd(a, ad.rows(t), ctx.lam, ctx.layer)
            grads = iter(regrad((w2, ad.conv(x, w2)), (gw, gs), inputs))
            return (next(grads) if need_x else None), (next(grads) if need_t else None), None, None, None
        if gw is None and gs is None:
            if ctx.shards is None:
                return None, None, None, None, None
            gw = w.new_zeros(w.shape)  # the other ranks' sum below needs this rank too
        if gs is not None:
            gw = ad.cross(x, gs) if gw is None else gw + ad.cross(x, gs)
        if ctx.shards is not None:  # Ŵ + XᵀŜ summed over the ranks (see distributed)
            gw = gw.clone() if gs is None else gw
            ctx.shards.sum_(gw)
        z = solve_with(gw, factor, ctx.inverse)
        xz = ad.conv(x, z)  # dL/dT
        gx = None
        if need_x:
            s = still_unchanged(ctx.sums_kept)
            s = ad.conv(x, w) if s is None else s
            gx = ad.fold(x.shape, z, t - s) + ad.fold(x.shape, w, (gs - xz) if gs is not None else -xz)
        return gx, (xz if need_t else None), None, None, None


class ConvTransposeAdapter(FeedForwardAdapter):
    """``nn.ConvTranspose1d/2d/3d`` with any stride, padding, output_padding, dilation and groups.

    The output is linear in the weight: a transposed conv is a stride-1 conv, with the same dilation and
    groups, over the input with ``stride − 1`` zeros stuffed between its elements and padded by
    ``dilation·(k − 1) − padding`` (plus ``output_padding`` at the end), with the kernel flipped and its two
    channel dimensions swapped. Eq. 6 is solved for that equivalent conv (:class:`ConvAdapter`, whose
    patch matrix A is the stuffed input's im2col: all output channels of a group share it), and its weight is
    turned back into the transposed layout."""

    def __init__(self, module: nn.modules.conv._ConvTransposeNd):
        super().__init__(module)
        self.kind = type(module).__name__
        self.nd = len(module.kernel_size)
        self.out_features = module.out_channels
        self.weight_shape = tuple(module.weight.shape)
        self.stride, self.padding = tuple(module.stride), tuple(module.padding)
        self.dilation, self.kernel_size = tuple(module.dilation), tuple(module.kernel_size)
        self.output_padding, self.groups = tuple(module.output_padding), module.groups
        self.module_type = type(module)
        equivalent = _CONV_MODULE[self.nd](module.in_channels, module.out_channels, module.kernel_size, 1, 0,
                                          module.dilation, module.groups, bias=self.has_bias, device="meta")
        self.equivalent, self.inner = equivalent, ConvAdapter(equivalent)
        self.inner.cache = self.cache

    def stuffed(self, x: Tensor, output_padding: tuple | None = None) -> Tensor:
        """The input with ``stride − 1`` zeros between elements, padded (or cropped) for the equivalent conv."""
        if x.dim() == self.nd + 1:  # an unbatched call
            x = x[None]
        extra = self.output_padding if output_padding is None else tuple(output_padding)
        if any(s > 1 for s in self.stride):
            z = x.new_zeros(*x.shape[:2], *[(n - 1) * s + 1 for n, s in zip(x.shape[2:], self.stride)])
            z[(slice(None), slice(None), *[slice(None, None, s) for s in self.stride])] = x
            x = z
        pad = []
        for k, d, p, e in reversed(list(zip(self.kernel_size, self.dilation, self.padding, extra))):
            pad += [d * (k - 1) - p, d * (k - 1) - p + e]
        return F.pad(x, pad) if any(pad) else x

    def _output_padding(self, module, args) -> tuple | None:
        """The output_padding of this call: from ``output_size`` when the call passes one."""
        size = args[1] if len(args) > 1 else None
        if size is None:
            return None
        return tuple(module._output_padding(args[0], size, list(self.stride), list(self.padding),
                                            list(self.kernel_size), self.nd, list(self.dilation)))

    def realise(self, module, args, targets, solves, name, optimistic):
        x = self.stuffed(args[0], self._output_padding(module, args))
        t = targets["weight"]
        wb, s = self.inner.realise(self.equivalent, (x,), {"weight": t if t.dim() == x.dim() else t[None]},
                                   solves, name, optimistic)
        wb["weight"] = self.transposed(wb["weight"])
        return wb, (s if t.dim() == x.dim() else s[0])

    def transposed(self, w: Tensor) -> Tensor:
        """The equivalent conv's weight (C_out, C_in/G, k...) as the transposed conv's (C_in, C_out/G, k...)."""
        g, k = self.groups, w.shape[2:]
        w = w.reshape(g, w.shape[0] // g, w.shape[1], *k).flip(list(range(3, 3 + self.nd))).transpose(1, 2)
        return w.reshape(self.weight_shape)

    def problems(self, sums):
        return self.inner.problems(sums)

    def in_rows(self) -> int:
        return self.inner.in_rows()

    def column_energy(self, module, args, output, sums):
        return {"weight": (self.inner.energy(self.stuffed(args[0], self._output_padding(module, args))),
                           self.in_rows())}


_CONV_MODULE = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def positional(forward, module: nn.Module, args: tuple, kwargs: dict) -> tuple:
    """The arguments of a call ``forward(module, *args, **kwargs)`` as positional ones (adapters read them so:
    ``ConvTranspose2d(x, output_size=...)``, ``nn.RNN(x, hx=...)``)."""
    if not kwargs:
        return args
    bound = inspect.signature(forward).bind(module, *args, **kwargs)
    return tuple(bound.arguments.values())[1:]
