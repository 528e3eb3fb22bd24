"""Realised weights against eq. 6, ``W[0:j] = T_j A[0:j)^‡``, ``A^‡ = Aᵀ(AAᵀ + λI)⁻¹``, computed here in float64.

The patch matrix A is built independently of the library: ``F.unfold`` for Conv2d (and Conv1d as a 2-D conv
with H = 1), explicit strided slicing for Conv3d, and our own padding arithmetic (incl. ``padding="same"`` and
every ``padding_mode``). Every im2col is first validated by reproducing the unconverted layer's own output
``conv(x) = W_orig A + b``, so a wrong patch matrix fails here, not in the comparison with the library.

Column layout (patterns = columns) as in the paper; the ones row sits on top of A, the bias is W's first
column. λ is absolute, on the unnormalised Gram including the bias row. Both Gram forms are exercised: for
every layer configuration there is a reference batch size with ``n̄·positions < d_in + 1`` (the library
should pick the dual form, eq. 23) and one with ``n̄·positions > d_in + 1`` (primal).
"""
from __future__ import annotations

import copy
import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import target_param as tp

DT = torch.float64


# ------------------------------------------------------------------------------------------- eq. 6
def ridge_weights(A, T, lam):
    """A: d × N (ones row already included), T: o × N. Returns o × d, checking primal == dual."""
    d, N = A.shape
    primal = torch.linalg.solve(A @ A.T + lam * torch.eye(d, dtype=DT), A @ T.T).T  # T Aᵀ(AAᵀ+λI)⁻¹
    dual = torch.linalg.solve(A.T @ A + lam * torch.eye(N, dtype=DT), T.T).T @ A.T  # T (AᵀA+λI)⁻¹ Aᵀ
    assert rel(primal, dual) < 1e-8, "the test's own primal and dual forms disagree"
    return primal


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


# ------------------------------------------------------------------------------------------- padding
def own_pads(conv):
    """Per spatial dim (left, right) padding, computed from the conv's hyper-parameters."""
    nd = len(conv.kernel_size)
    if conv.padding == "same":
        out = []
        for k, d in zip(conv.kernel_size, conv.dilation):
            total = d * (k - 1)
            out.append((total // 2, total - total // 2))
        return out
    if conv.padding == "valid":
        return [(0, 0)] * nd
    return [(p, p) for p in conv.padding]


def pad_input(x, conv):
    pads = own_pads(conv)
    flat = [v for lr in reversed(pads) for v in lr]  # F.pad wants the last dim first
    if not any(flat):
        return x
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, flat, mode=mode)


# ------------------------------------------------------------------------------------------- im2col
def im2col(conv, x):
    """(n, C_in·K, P) patch tensor (channel-major, then kernel offsets, like the weight) and the output spatial shape."""
    xp = pad_input(x, conv)
    if isinstance(conv, nn.Conv2d):
        cols = F.unfold(xp, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
        out_sp = [(xp.shape[2 + i] - conv.dilation[i] * (conv.kernel_size[i] - 1) - 1) // conv.stride[i] + 1 for i in range(2)]
        return cols, out_sp
    if isinstance(conv, nn.Conv1d):
        k, d, s = conv.kernel_size[0], conv.dilation[0], conv.stride[0]
        cols = F.unfold(xp.unsqueeze(2), (1, k), dilation=(1, d), stride=(1, s))
        return cols, [(xp.shape[2] - d * (k - 1) - 1) // s + 1]
    if isinstance(conv, nn.Conv3d):
        n, C = xp.shape[:2]
        ks, ds, ss = conv.kernel_size, conv.dilation, conv.stride
        out_sp = [(xp.shape[2 + i] - ds[i] * (ks[i] - 1) - 1) // ss[i] + 1 for i in range(3)]
        pieces = []
        for a, b, c in itertools.product(*(range(k) for k in ks)):
            o0, o1, o2 = a * ds[0], b * ds[1], c * ds[2]
            pieces.append(xp[:, :,
                             o0:o0 + ss[0] * (out_sp[0] - 1) + 1:ss[0],
                             o1:o1 + ss[1] * (out_sp[1] - 1) + 1:ss[1],
                             o2:o2 + ss[2] * (out_sp[2] - 1) + 1:ss[2]])
        cols = torch.stack(pieces, 2)  # (n, C, K, D', H', W')
        return cols.reshape(n, C * math.prod(ks), -1), out_sp
    raise TypeError(type(conv))


def expected_weights(layer, x, T, lam):
    """Eq. 6 for ``layer`` whose input on the reference batch is ``x`` and whose target is ``T`` (library
    layout: shaped like the layer output). Returns (weight, bias or None, list of (rows, cols) per problem)."""
    has_bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        A = x.reshape(-1, layer.in_features).T  # d × N
        Tc = T.reshape(-1, layer.out_features).T  # o × N
        if has_bias:
            A = torch.cat([torch.ones(1, A.shape[1], dtype=DT), A])
        W = ridge_weights(A, Tc, lam)
        return (W[:, 1:], W[:, 0]) if has_bias else (W, None), [tuple(A.shape)]
    G = layer.groups
    cols, out_sp = im2col(layer, x)
    n, CK, P = cols.shape
    assert tuple(T.shape[2:]) == tuple(out_sp)
    Og = layer.out_channels // G
    Tr = T.reshape(n, layer.out_channels, P)
    ws, bs, shapes = [], [], []
    for g in range(G):
        A = cols[:, g * CK // G:(g + 1) * CK // G].permute(1, 0, 2).reshape(CK // G, n * P)
        Tc = Tr[:, g * Og:(g + 1) * Og].permute(1, 0, 2).reshape(Og, n * P)
        if has_bias:
            A = torch.cat([torch.ones(1, A.shape[1], dtype=DT), A])
        W = ridge_weights(A, Tc, lam)
        shapes.append(tuple(A.shape))
        if has_bias:
            bs.append(W[:, 0])
            W = W[:, 1:]
        ws.append(W)
    weight = torch.cat(ws).reshape(layer.weight.shape)
    return (weight, torch.cat(bs) if has_bias else None), shapes


def check_im2col(layer, x):
    """The test's own A must reproduce the unconverted layer: out = W A (+ b)."""
    if isinstance(layer, nn.Linear):
        return
    with torch.no_grad():
        T = layer(x)
        G = layer.groups
        cols, out_sp = im2col(layer, x)
        n, CK, P = cols.shape
        w = layer.weight.reshape(G, layer.out_channels // G, CK // G)
        a = cols.reshape(n, G, CK // G, P)
        out = torch.einsum("goc,ngcp->ngop", w, a).reshape(n, layer.out_channels, *out_sp)
        if layer.bias is not None:
            out = out + layer.bias.reshape(1, -1, *([1] * len(out_sp)))
    assert out.shape == T.shape and rel(out, T) < 1e-12, "the test's im2col does not reproduce the conv"


# ------------------------------------------------------------------------------------------- configs
# name -> (factory, per-pattern input shape, n̄ giving the dual form, n̄ giving the primal form)
CONFIGS = {
    "linear": (lambda: nn.Linear(6, 4), (6,), 4, 15),
    "linear-nobias": (lambda: nn.Linear(6, 4, bias=False), (6,), 3, 11),
    "linear-3d": (lambda: nn.Linear(5, 3), (4, 5), 1, 3),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3), (3, 5, 5), 2, 5),
    "conv2d-stride-pad": (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (3, 5, 6), 2, 5),
    "conv2d-nobias-rect": (lambda: nn.Conv2d(2, 5, (2, 3), stride=(1, 2), padding=(1, 0), bias=False), (2, 2, 5), 1, 3),
    "conv2d-same-even": (lambda: nn.Conv2d(2, 3, (2, 4), padding="same"), (2, 3, 4), 1, 3),
    "conv2d-same-dilated": (lambda: nn.Conv2d(2, 3, (3, 2), padding="same", dilation=(2, 3)), (2, 2, 3), 1, 3),
    "conv2d-valid": (lambda: nn.Conv2d(2, 3, 2, padding="valid"), (2, 3, 3), 1, 3),
    "conv2d-reflect": (lambda: nn.Conv2d(2, 3, 3, padding=(1, 2), padding_mode="reflect"), (2, 2, 3), 1, 3),
    "conv2d-replicate": (lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1, padding_mode="replicate"), (2, 5, 5), 1, 3),
    "conv2d-circular": (lambda: nn.Conv2d(2, 3, 3, padding=(2, 1), padding_mode="circular"), (2, 2, 2), 1, 3),
    "conv2d-same-reflect": (lambda: nn.Conv2d(2, 3, 3, padding="same", padding_mode="reflect"), (2, 3, 3), 1, 3),
    "conv2d-dilation": (lambda: nn.Conv2d(3, 2, 3, dilation=2, stride=(1, 2)), (3, 6, 7), 1, 8),
    "conv2d-groups": (lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1), (4, 3, 3), 1, 3),
    "conv2d-depthwise": (lambda: nn.Conv2d(3, 3, 3, groups=3), (3, 5, 5), 1, 2),
    "conv2d-depthwise-mult": (lambda: nn.Conv2d(3, 6, (2, 2), groups=3, padding=1, padding_mode="circular"), (3, 1, 1), 1, 2),
    "conv2d-depthwise-nobias": (lambda: nn.Conv2d(4, 4, 3, groups=4, bias=False, padding="same"), (4, 2, 4), 1, 2),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3), (3, 6), 2, 4),
    "conv1d-stride-dil": (lambda: nn.Conv1d(3, 4, 3, stride=2, dilation=2, padding=2), (3, 9), 1, 6),
    "conv1d-same-reflect": (lambda: nn.Conv1d(2, 3, 4, padding="same", padding_mode="reflect"), (2, 5), 1, 3),
    "conv1d-circular-groups": (lambda: nn.Conv1d(4, 2, 3, groups=2, padding=1, padding_mode="circular"), (4, 3), 2, 4),
    "conv1d-replicate-nobias": (lambda: nn.Conv1d(2, 3, 3, padding=2, padding_mode="replicate", bias=False), (2, 3), 1, 2),
    "conv3d": (lambda: nn.Conv3d(2, 3, (2, 3, 2)), (2, 3, 4, 3), 1, 4),
    "conv3d-stride-pad": (lambda: nn.Conv3d(2, 3, 2, stride=(1, 2, 2), padding=(1, 0, 1)), (2, 2, 2, 3), 1, 4),
    "conv3d-reflect": (lambda: nn.Conv3d(1, 2, 3, padding=1, padding_mode="reflect"), (1, 3, 3, 3), 1, 2),
    "conv3d-replicate-dil": (lambda: nn.Conv3d(2, 2, 2, dilation=(1, 2, 1), padding=1, padding_mode="replicate"), (2, 1, 1, 1), 1, 5),
    "conv3d-circular-groups": (lambda: nn.Conv3d(2, 4, 2, groups=2, padding=(1, 1, 0), padding_mode="circular"), (2, 1, 1, 2), 1, 3),
    "conv3d-same-nobias": (lambda: nn.Conv3d(2, 2, (3, 2, 1), padding="same", bias=False), (2, 2, 2, 2), 1, 2),
}


def make(name, seed):
    torch.manual_seed(seed)
    factory, shape, nbar_dual, nbar_primal = CONFIGS[name]
    return factory().to(DT), shape, nbar_dual, nbar_primal


def convert(model, ref, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tp.RankDeficientWarning)
        tp.to_target_space(model, ref, **kw)


def assert_layer_matches(layer, x_ref, lam, T=None):
    T = layer.parametrizations.weight.original.detach() if T is None else T
    (w_exp, b_exp), shapes = expected_weights(layer, x_ref, T, lam)
    with torch.no_grad():
        w, b = layer.weight, layer.bias
    assert w.shape == w_exp.shape
    assert rel(w, w_exp) < 1e-9, "realised weight differs from eq. 6"
    if b_exp is None:
        assert b is None or b.numel() == 0
    else:
        assert b.shape == b_exp.shape
        assert rel(b, b_exp) < 1e-9, "realised bias differs from eq. 6"
    return shapes


# ------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("form", ["dual", "primal"])
@pytest.mark.parametrize("lam", [1e-3, 0.5])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_single_layer_eq6(name, lam, form):
    """Single converted layer in a Sequential: its input on X̄ is X̄ itself."""
    layer, shape, nbar_dual, nbar_primal = make(name, seed=len(name))
    nbar = nbar_dual if form == "dual" else nbar_primal
    gen = torch.Generator().manual_seed(11)
    ref = torch.randn(nbar, *shape, generator=gen, dtype=DT)
    check_im2col(layer, ref)
    model = nn.Sequential(layer)
    convert(model, ref, lam=lam, init="random")
    T = layer.parametrizations.weight.original
    assert T.shape == model_output_shape(name, ref)
    shapes = assert_layer_matches(layer, ref, lam)
    for rows, cols in shapes:  # the configuration really exercises the intended Gram form
        assert (cols < rows) == (form == "dual"), (rows, cols)


def model_output_shape(name, ref):
    with torch.no_grad():
        return make(name, 0)[0](ref).shape


@pytest.mark.parametrize("lam", [1e-3, 0.5])
@pytest.mark.parametrize("name", ["linear", "linear-3d", "conv2d-stride-pad", "conv1d-stride-dil", "conv3d-stride-pad"])
def test_after_new_targets(name, lam):
    """Assign fresh (non-projected) targets in place; the realised weights follow eq. 6 for the new T."""
    layer, shape, _, nbar = make(name, seed=3)
    gen = torch.Generator().manual_seed(5)
    ref = torch.randn(nbar, *shape, generator=gen, dtype=DT)
    model = nn.Sequential(layer)
    convert(model, ref, lam=lam, init="project")
    T = layer.parametrizations.weight.original
    with torch.no_grad():
        T.copy_(torch.randn(T.shape, generator=gen, dtype=DT) * 2)
    assert_layer_matches(layer, ref, lam)


@pytest.mark.parametrize("name", ["linear", "conv2d-groups", "conv1d-same-reflect", "conv3d-reflect"])
def test_root_is_the_layer(name):
    """Converting a bare layer (it is both root and converted layer)."""
    layer, shape, _, nbar = make(name, seed=9)
    ref = torch.randn(nbar, *shape, generator=torch.Generator().manual_seed(2), dtype=DT)
    convert(layer, ref, lam=0.1, init="random")
    assert_layer_matches(layer, ref, 0.1)


@pytest.mark.parametrize("lam", [1e-3, 0.5])
@pytest.mark.parametrize("name", ["linear", "conv2d-same-dilated", "conv2d-depthwise", "conv1d-circular-groups", "conv3d-circular-groups"])
def test_layer_behind_weight_space_layer(name, lam):
    """A converted layer fed by an unconverted one: A is captured by a forward hook on an unconverted copy."""
    layer, shape, _, nbar = make(name, seed=4)
    if isinstance(layer, nn.Linear):
        front = nn.Linear(shape[-1], layer.in_features)
    else:
        front = type(layer)(layer.in_channels, layer.in_channels, 1)
    model = nn.Sequential(front.to(DT), nn.Tanh(), layer)
    ref = torch.randn(nbar, *shape, generator=torch.Generator().manual_seed(8), dtype=DT)
    captured = {}
    copy_ = copy.deepcopy(model)
    copy_[2].register_forward_hook(lambda m, args, out: captured.setdefault("x", args[0].detach().clone()))
    with torch.no_grad():
        copy_(ref)
    convert(model, ref, lam=lam, init="random", filter_fn=lambda m, n: n == "2")
    assert not tp.is_target_space(model[0]) and isinstance(model[0]._parameters["weight"], nn.Parameter)
    assert_layer_matches(model[2], captured["x"], lam)


@pytest.mark.parametrize("cascade", ["sequential", "optimistic"])
@pytest.mark.parametrize("lam", [1e-3, 0.5])
@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d", "conv3d"])
def test_two_converted_layers(kind, lam, cascade):
    """Layer 2's input is computed here: tanh(layer1 with *our* eq.-6 weights applied to X̄) for SCU, or
    tanh(T_1) for OCU (eq. 8)."""
    torch.manual_seed(21)
    if kind == "linear":
        l1, l2, shape = nn.Linear(3, 5), nn.Linear(5, 2), (3,)
    elif kind == "conv1d":
        l1, l2, shape = nn.Conv1d(2, 4, 3, padding=1, padding_mode="reflect"), nn.Conv1d(4, 2, 2, stride=2, groups=2), (2, 6)
    elif kind == "conv2d":
        l1, l2, shape = nn.Conv2d(2, 4, 3, padding="same"), nn.Conv2d(4, 3, 2, stride=2, dilation=1), (2, 4, 4)
    else:
        l1, l2, shape = nn.Conv3d(1, 2, 2, padding=1, padding_mode="circular"), nn.Conv3d(2, 2, 2, groups=2), (1, 2, 2, 3)
    model = nn.Sequential(l1, nn.Tanh(), l2).to(DT)
    ref = torch.randn(4, *shape, generator=torch.Generator().manual_seed(1), dtype=DT)
    plain1 = copy.deepcopy(l1)
    convert(model, ref, lam=lam, init="random", cascade=cascade)
    T1 = l1.parametrizations.weight.original.detach()
    with torch.no_grad():  # move off the projected point
        T1.add_(0.5 * torch.randn(T1.shape, generator=torch.Generator().manual_seed(2), dtype=DT))
    (w1, b1), _ = expected_weights(l1, ref, T1, lam)
    assert_layer_matches(l1, ref, lam)
    with torch.no_grad():
        plain1.weight.copy_(w1)
        plain1.bias.copy_(b1)
        x2 = torch.tanh(plain1(ref)) if cascade == "sequential" else torch.tanh(T1)
    assert_layer_matches(model[2], x2, lam)
