"""Algorithm 3 (the explicit target gradient), written from the paper, against the library's autograd.

Everything here is in the paper's column layout: patterns are columns, ``A[0:j)`` is (1 + d_in) × n̄ with the
row of ones on *top* (eq. 2a), ``W[0:j]`` is d_out × (1 + d_in) with the bias as its *first* column (eq. 3a),
``T_j`` and ``S_j`` are d_out × n̄. The library works in row layout with the bias last; we only ever compare
through ``layer.weight`` / ``layer.bias`` and ``T.grad`` (transposed), so nothing of its layout leaks in.

Networks are MLPs with tanh hidden layers, either with ALL shortcut connections (each layer sees
``[1; X; A_1; ...; A_{j-1}]``, eq. 2b, like the paper's 2-5-5-5-2 two-spirals net) or a plain chain.
The loss is evaluated on a training minibatch X (n patterns) that differs from the reference batch X̄
(n̄ patterns, n ≠ n̄).

Derivation used for the backward recursion (SCU and OCU)
--------------------------------------------------------
Let ``M = (A Aᵀ + λI)⁻¹`` (symmetric), ``A^‡ = Aᵀ M`` and ``W = T Aᵀ M``. Let ``Ḡ = ∂L/∂W`` be the *total*
derivative of the loss w.r.t. the realised weight of a layer (everything that depends on W, with T and A held
fixed). Differentiating ``W = T Aᵀ M`` with ``dM = −M (dA Aᵀ + A dAᵀ) M``:

    dW = dT Aᵀ M + T dAᵀ M − W dA Aᵀ M − W A dAᵀ M

so, with ⟨X, Y⟩ = tr(Xᵀ Y):

    ∂L/∂T |via W = Ḡ M A = Ḡ (A^‡)ᵀ
    ∂L/∂A |via W = M Ḡᵀ T − Wᵀ Ḡ M A − M Ḡᵀ W A = −Wᵀ (Ḡ (A^‡)ᵀ) + M Ḡᵀ (T − S),   S = W A.

SCU (Algorithm 2): ``A_j = g(S_j)`` with ``S_j = W_j A[0:j)``, so W_j also reaches the loss through S_j:
``δS_j = δA_j ⊙ g'(S_j)``, ``Ḡ_j = G_j + δS_j A[0:j)ᵀ`` (G_j from the training pass with weights fixed), and
S_j's direct dependence on A adds ``W_jᵀ δS_j``. Altogether (this is exactly the paper's Algorithm 3):

    ∂L/∂T_j  = Ḡ_j (A^‡)ᵀ
    δA[0:j) += W_jᵀ (δS_j − ∂L/∂T_j) + M Ḡ_jᵀ (T_j − S_j)

OCU (eq. 8): the reference pass carries ``A_j = g(T_j)`` forward instead; S_j is computed but feeds nothing.
So W_j reaches the loss only through the training pass (``Ḡ_j = G_j``), and T_j gets the extra term that in
SCU would have flowed into S_j, now through g(T_j) directly:

    ∂L/∂T_j  = G_j (A^‡)ᵀ + δA_j ⊙ g'(T_j)
    δA[0:j) += −W_jᵀ (G_j (A^‡)ᵀ) + M G_jᵀ (T_j − S_j)

In both, δA[0:j) drops its bias row and its X̄ rows; the row block of each earlier hidden layer k adds into δA_k.
"""
from __future__ import annotations

import warnings
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import target_param as tp
from target_param.convert import realisers

DT = torch.float64


# ------------------------------------------------------------------------------------------- model
class ShortcutMLP(nn.Module):
    """``sizes = [d0, h1, ..., out]``; tanh hidden layers; with ``shortcuts`` each Linear sees cat(x, A_1..A_{j-1})."""

    def __init__(self, sizes, shortcuts: bool):
        super().__init__()
        self.sizes, self.shortcuts = list(sizes), shortcuts
        layers = []
        for j in range(1, len(sizes)):
            d_in = sum(sizes[:j]) if shortcuts else sizes[j - 1]
            layers.append(nn.Linear(d_in, sizes[j]))
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        feats = [x]
        for lin in self.layers[:-1]:
            inp = torch.cat(feats, 1) if self.shortcuts else feats[-1]
            feats.append(torch.tanh(lin(inp)))
        inp = torch.cat(feats, 1) if self.shortcuts else feats[-1]
        return self.layers[-1](inp)


# ------------------------------------------------------------------------------------------- reference
def layer_input(sizes, shortcuts, j, x_col, acts):
    """A[0:j) (columns = patterns) with the ones row on top; ``acts[k]`` = activation of hidden layer k."""
    n = x_col.shape[1]
    ones = torch.ones(1, n, dtype=DT)
    if shortcuts:
        return torch.cat([ones, x_col, *acts[:j]], 0)
    return torch.cat([ones, x_col if j == 0 else acts[j - 1]], 0)


def input_row_blocks(sizes, shortcuts, j):
    """For the stacked input of layer j: list of (source, start, stop) rows, source = -1 (X) or hidden k."""
    blocks, r = [], 1  # row 0 is the bias row
    srcs = [-1, *range(j)] if shortcuts else [j - 1]
    for s in srcs:
        width = sizes[0] if s == -1 else sizes[s + 1]
        blocks.append((s, r, r + width))
        r += width
    return blocks


def algorithm2(targets, xbar_col, sizes, shortcuts, lam, cascade):
    """Targets (list of d_out × n̄) → weights (list of d_out × (1+d_in)), plus S, A-inputs, M per layer."""
    L = len(targets)
    acts, Ws, Ss, As, Ms = [], [], [], [], []
    for j in range(L):
        A = layer_input(sizes, shortcuts, j, xbar_col, acts)
        gram = A @ A.T + lam * torch.eye(A.shape[0], dtype=DT)
        M = torch.linalg.inv(gram)
        W = torch.linalg.solve(gram, A @ targets[j].T).T  # T Aᵀ (AAᵀ+λI)⁻¹ = T A^‡
        S = W @ A
        Ws.append(W), Ss.append(S), As.append(A), Ms.append(M)
        if j < L - 1:
            acts.append(torch.tanh(S if cascade == "sequential" else targets[j]))
    return Ws, Ss, As, Ms


def training_loss(Ws, x_col, sizes, shortcuts, loss_fn):
    acts = []
    for j, W in enumerate(Ws):
        A = layer_input(sizes, shortcuts, j, x_col, acts)
        S = W @ A
        if j < len(Ws) - 1:
            acts.append(torch.tanh(S))
    return loss_fn(S)


def algorithm3(targets, xbar_col, x_col, sizes, shortcuts, lam, cascade, loss_fn, inverse_term=True):
    """Explicit dL/dT_j (column layout) for SCU or OCU, as derived in the module docstring.

    ``inverse_term=False`` drops the (AAᵀ+λI)⁻¹ … (T − S) term, as earlier work did (section 2.4)."""
    Ws, Ss, As, Ms = algorithm2(targets, xbar_col, sizes, shortcuts, lam, cascade)
    # G_j: ordinary backprop through the training pass, weights held fixed (weights are autograd leaves).
    leaves = [W.detach().clone().requires_grad_(True) for W in Ws]
    Gs = torch.autograd.grad(training_loss(leaves, x_col, sizes, shortcuts, loss_fn), leaves)
    L = len(targets)
    dA = [torch.zeros_like(Ss[k]) for k in range(L - 1)]
    dT = [None] * L
    for j in reversed(range(L)):
        W, S, A, M, G, T = Ws[j], Ss[j], As[j], Ms[j], Gs[j], targets[j]
        Adag_T = M @ A  # (A^‡)ᵀ
        if cascade == "sequential":
            dS = dA[j] * (1 - torch.tanh(S) ** 2) if j < L - 1 else torch.zeros_like(S)
            Gbar = G + dS @ A.T
            dT[j] = Gbar @ Adag_T
            dAin = W.T @ (dS - dT[j]) + (M @ Gbar.T @ (T - S) if inverse_term else 0)
        else:
            via_w = G @ Adag_T
            dT[j] = via_w + (dA[j] * (1 - torch.tanh(T) ** 2) if j < L - 1 else 0)
            dAin = -W.T @ via_w + (M @ G.T @ (T - S) if inverse_term else 0)
        for src, r0, r1 in input_row_blocks(sizes, shortcuts, j):
            if src >= 0:
                dA[src] = dA[src] + dAin[r0:r1]
    return dT, Ws


# ------------------------------------------------------------------------------------------- fixtures
def spiral_points(n, gen):
    t = torch.rand(n, generator=gen, dtype=DT) * 3 * torch.pi + 0.5
    s = torch.where(torch.rand(n, generator=gen, dtype=DT) < 0.5, -1.0, 1.0).to(DT)
    x = torch.stack([s * t * torch.cos(t), s * t * torch.sin(t)], 1) / 4
    y = (s > 0).long()
    return x + 0.05 * torch.randn(x.shape, generator=gen, dtype=DT), y


def build(sizes, shortcuts, nbar, lam, cascade, perturb, seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ShortcutMLP(sizes, shortcuts).to(DT)
    if sizes[0] == 2:
        xbar, _ = spiral_points(nbar, gen)
    else:
        xbar = torch.randn(nbar, sizes[0], generator=gen, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tp.RankDeficientWarning)
        tp.to_target_space(model, xbar, lam=lam, init="random", cascade=cascade)
    if perturb:  # move off the projected point so that T_j − S_j ≠ 0 (the inverse-derivative term matters)
        with torch.no_grad():
            for lin in model.layers:
                T = lin.parametrizations.weight.original
                T.add_(0.7 * torch.randn(T.shape, generator=gen, dtype=DT))
    return model, xbar, gen


def col_targets(model):
    return [lin.parametrizations.weight.original.detach().clone().T for lin in model.layers]


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


CASES = [
    # sizes, shortcuts, n̄, n
    ([2, 5, 5, 5, 2], True, 31, 17),  # the paper's two-spirals net; n̄ > d_in + 1 for every layer (primal)
    ([2, 5, 5, 5, 2], True, 11, 23),  # n̄ < 18 = d_in + 1 of the last layer: under-rank (dual Gram)
    ([3, 6, 4, 3], False, 19, 8),  # plain chain
    ([4, 7, 7, 2], False, 5, 12),  # plain chain, under-rank n̄
    # n = 0: full batch, the minibatch is the reference batch itself (X = X̄, section 5.1); under SCU the
    # training forward is then the reference pass's (Realiser.is_reference_call), checked here too
    ([2, 5, 5, 5, 2], True, 31, 0),
    ([3, 6, 4, 3], False, 19, 0),
    # d_in + 1 = 10 > n̄ = 6: the first layer's input is the fixed reference batch in the dual form (eq. 23),
    # solved by precomputed projections (solver.Solves.projections); the second layer is dual, not fixed
    ([9, 6, 4, 3], False, 6, 8),
    ([9, 6, 4, 3], False, 6, 0),
]


def case_id(c):
    sizes, sc, nbar, n = c
    return f"{'-'.join(map(str, sizes))}{'-shortcut' if sc else '-chain'}-nbar{nbar}-n{n}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("lam", [1e-3, 0.5])
@pytest.mark.parametrize("cascade", ["sequential", "optimistic"])
@pytest.mark.parametrize("loss", ["xent", "mse"])
@pytest.mark.parametrize("perturb", [False, True], ids=["projected", "perturbed"])
def test_target_gradient_matches_algorithm3(case, lam, cascade, loss, perturb):
    sizes, shortcuts, nbar, n = case
    model, xbar, gen = build(sizes, shortcuts, nbar, lam, cascade, perturb, seed=zlib.crc32(f"{sizes}{nbar}{loss}{lam}".encode()))
    full_batch = n == 0
    if full_batch:
        n, x = nbar, xbar
        y = torch.randint(0, sizes[-1], (n,), generator=gen)
    elif sizes[0] == 2:
        x, y = spiral_points(n, gen)
    else:
        x = torch.randn(n, sizes[0], generator=gen, dtype=DT)
        y = torch.randint(0, sizes[-1], (n,), generator=gen)
    yt = torch.randn(n, sizes[-1], generator=gen, dtype=DT)

    def loss_rows(out):  # out: n × d_out (row layout)
        if loss == "xent":
            return F.cross_entropy(out, y)
        return 0.5 * ((out - yt) ** 2).sum() / n

    def loss_cols(S):  # S: d_out × n (column layout)
        return loss_rows(S.T)

    targets = col_targets(model)
    expected, Ws = algorithm3(targets, xbar.T, x.T, sizes, shortcuts, lam, cascade, loss_cols)

    model.zero_grad()
    merges = realisers(model)[0].merges
    out = model(x)
    loss_rows(out).backward()
    assert realisers(model)[0].merges - merges == (full_batch and cascade == "sequential")
    for j, lin in enumerate(model.layers):
        got = lin.parametrizations.weight.original.grad
        assert got is not None, f"layer {j}: no gradient reached the target"
        assert got.shape == (nbar, sizes[j + 1])
        assert expected[j].norm() > 1e-6, "degenerate test: zero expected gradient"
        assert rel_err(got.T, expected[j]) < 1e-8, f"layer {j}: dL/dT differs from Algorithm 3"

    # the realised weights are Algorithm 2's (bias = first column in the paper's layout)
    with torch.no_grad():
        for j, lin in enumerate(model.layers):
            assert rel_err(lin.bias, Ws[j][:, 0]) < 1e-9, f"layer {j}: bias differs from Algorithm 2"
            assert rel_err(lin.weight, Ws[j][:, 1:]) < 1e-9, f"layer {j}: weight differs from Algorithm 2"


@pytest.mark.parametrize("cascade", ["sequential", "optimistic"])
def test_inverse_derivative_term_is_needed(cascade):
    """Away from the projected point, dropping the (AAᵀ+λI)⁻¹ … (T − S) term (as earlier work did, section
    2.4) changes the hidden layers' gradient measurably; the library agrees with the full recursion only."""
    sizes, nbar, n, lam = [2, 5, 5, 5, 2], 15, 9, 1e-3
    model, xbar, gen = build(sizes, True, nbar, lam, cascade, perturb=True, seed=7)
    x, y = spiral_points(n, gen)
    targets = col_targets(model)
    loss_cols = lambda S: F.cross_entropy(S.T, y)  # noqa: E731
    full, _ = algorithm3(targets, xbar.T, x.T, sizes, True, lam, cascade, loss_cols)
    truncated, _ = algorithm3(targets, xbar.T, x.T, sizes, True, lam, cascade, loss_cols, inverse_term=False)

    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    got = [lin.parametrizations.weight.original.grad.T for lin in model.layers]
    for j in range(len(sizes) - 1):
        assert rel_err(got[j], full[j]) < 1e-8, f"layer {j}"
    # the output layer has nothing downstream, so both recursions agree there
    assert rel_err(truncated[-1], full[-1]) < 1e-12
    assert max(rel_err(truncated[j], full[j]) for j in range(len(sizes) - 2)) > 1e-3
    assert max(rel_err(got[j], truncated[j]) for j in range(len(sizes) - 2)) > 1e-3


def test_reference_agrees_with_finite_differences():
    """Guard on the test's own Algorithm 3: central differences of the column-layout composition."""
    sizes, nbar, n, lam = [2, 4, 3, 2], 9, 6, 0.5
    gen = torch.Generator().manual_seed(3)
    xbar, _ = spiral_points(nbar, gen)
    x, y = spiral_points(n, gen)
    targets = [torch.randn(sizes[j + 1], nbar, generator=gen, dtype=DT) for j in range(len(sizes) - 1)]
    loss_cols = lambda S: F.cross_entropy(S.T, y)  # noqa: E731
    for cascade in ("sequential", "optimistic"):
        expected, _ = algorithm3(targets, xbar.T, x.T, sizes, True, lam, cascade, loss_cols)

        def f(ts):
            Ws, *_ = algorithm2(ts, xbar.T, sizes, True, lam, cascade)
            return training_loss(Ws, x.T, sizes, True, loss_cols)

        eps = 1e-6
        for j in range(len(targets)):
            fd = torch.zeros_like(targets[j])
            for idx in range(targets[j].numel()):
                plus = [t.clone() for t in targets]
                minus = [t.clone() for t in targets]
                plus[j].view(-1)[idx] += eps
                minus[j].view(-1)[idx] -= eps
                fd.view(-1)[idx] = (f(plus) - f(minus)) / (2 * eps)
            assert rel_err(expected[j], fd) < 1e-6, (cascade, j)


# ------------------------------------------------------------------------------------------- conv layers
# The same recursion for Conv2d layers (section 4.2): per group, A[0:j) is the im2col matrix of the layer's
# input, taken by F.unfold from the input itself (columns ordered (n, position), rows (c, k_h, k_w), the ones
# row on top), T_j and S_j are the group's output channels in the same column order, and δA[0:j) (ones row
# dropped) goes back onto the input image by F.fold (col2im, the adjoint of unfold: overlapping patches add,
# padding is cut off). The training pass is F.conv2d / F.linear with each group's W as an autograd leaf.
class ConvNet(nn.Module):
    """Conv2d 3→6 (stride 1, padding 1), Conv2d 6→6 (stride 2, padding 1, 3 groups), Conv2d 6→4 (padding 1,
    no bias), tanh after each, then a Linear on the flattened 4×4×4 activations. Input 8×8."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=3),
                                     nn.Conv2d(6, 4, 3, padding=1, bias=False), nn.Linear(64, 3)])

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = torch.tanh(layer(x))
        return self.layers[-1](x.flatten(1))


def _groups(layer):
    return getattr(layer, "groups", 1)


def conv_cols(layer, inp):
    """Per group, A[0:j) (columns = patterns) of ``layer`` on the input image ``inp``, ones row on top."""
    if isinstance(layer, nn.Linear):
        blocks = [inp.flatten(1).T]
    else:
        cols = F.unfold(inp, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # (n, C·k, L)
        n, rows, positions = cols.shape
        d = rows // layer.groups
        blocks = [cols[:, g * d:(g + 1) * d].permute(1, 0, 2).reshape(d, n * positions) for g in range(layer.groups)]
    if layer.bias is not None:
        blocks = [torch.cat([torch.ones(1, b.shape[1], dtype=DT), b], 0) for b in blocks]
    return blocks


def out_cols(layer, t):
    """Per group, the output-shaped ``t`` (n, C_out, H, W) or (n, o) as d_out/G × (n·positions) columns."""
    if isinstance(layer, nn.Linear):
        return [t.T]
    n, o = t.shape[:2]
    og = o // layer.groups
    return [t[:, g * og:(g + 1) * og].reshape(n, og, -1).permute(1, 0, 2).reshape(og, -1) for g in range(layer.groups)]


def out_image(layer, blocks, shape):
    """The inverse of ``out_cols``."""
    if isinstance(layer, nn.Linear):
        return blocks[0].T.reshape(shape)
    return torch.cat([b.reshape(b.shape[0], shape[0], -1).permute(1, 0, 2) for b in blocks], 1).reshape(shape)


def fold_input(layer, blocks, shape):
    """col2im: per-group δA rows (ones row dropped) back onto the layer's input image of ``shape``."""
    if isinstance(layer, nn.Linear):
        return blocks[0].T.reshape(shape)
    cols = torch.cat([b.reshape(b.shape[0], shape[0], -1).permute(1, 0, 2) for b in blocks], 1)
    return F.fold(cols, shape[2:], layer.kernel_size, layer.dilation, layer.padding, layer.stride)


def apply_layer(layer, inp, Ws):
    """Algorithm 1 for one layer with the per-group augmented weights ``Ws`` (bias = first column)."""
    has_bias = layer.bias is not None
    w = torch.cat([W[:, 1:] if has_bias else W for W in Ws], 0)
    b = torch.cat([W[:, 0] for W in Ws]) if has_bias else None
    if isinstance(layer, nn.Linear):
        return F.linear(inp.flatten(1), w, b)
    return F.conv2d(inp, w.reshape(layer.weight.shape), b, layer.stride, layer.padding, layer.dilation, layer.groups)


def algorithm2_conv(net, targets, xbar, lam, cascade):
    """Algorithm 2 on ``net``'s layers from their targets (library layout, e.g. (n̄, C, H, W)): per layer the
    per-group W, S, A, M = (AAᵀ+λI)⁻¹, and S as an image."""
    inp, out = xbar, []
    for j, layer in enumerate(net.layers):
        As, Ts = conv_cols(layer, inp), out_cols(layer, targets[j])
        rec = dict(As=As, Ws=[], Ss=[], Ms=[], in_shape=inp.shape)
        for A, T in zip(As, Ts):
            gram = A @ A.T + lam * torch.eye(A.shape[0], dtype=DT)
            W = torch.linalg.solve(gram, A @ T.T).T  # T A^‡
            rec["Ws"].append(W), rec["Ss"].append(W @ A), rec["Ms"].append(torch.linalg.inv(gram))
        rec["S"] = out_image(layer, rec["Ss"], targets[j].shape)
        out.append(rec)
        inp = torch.tanh(rec["S"] if cascade == "sequential" else targets[j])
    return out


def algorithm3_conv(net, targets, xbar, x, lam, cascade, loss_fn):
    """Explicit dL/dT_j (library layout) of ``net``: the recursion of ``algorithm3``, per group, with δA folded
    back onto each layer's input image (``fold_input``)."""
    recs = algorithm2_conv(net, targets, xbar, lam, cascade)
    leaves = [[W.detach().clone().requires_grad_(True) for W in rec["Ws"]] for rec in recs]
    inp = x
    for j, layer in enumerate(net.layers):
        out = apply_layer(layer, inp, leaves[j])
        inp = torch.tanh(out)
    flat = torch.autograd.grad(loss_fn(out), [W for ws in leaves for W in ws])
    Gs, k = [], 0
    for ws in leaves:
        Gs.append(flat[k:k + len(ws)])
        k += len(ws)
    L = len(recs)
    dA = [torch.zeros_like(rec["S"]) for rec in recs[:-1]]
    dT = [None] * L
    for j in reversed(range(L)):
        layer, rec = net.layers[j], recs[j]
        has_bias = layer.bias is not None
        last = j == L - 1
        if cascade == "sequential":
            dS = out_cols(layer, torch.zeros_like(rec["S"]) if last else dA[j] * (1 - torch.tanh(rec["S"]) ** 2))
        dTs, dAins = [], []
        for g, (W, S, A, M, G, T) in enumerate(zip(rec["Ws"], rec["Ss"], rec["As"], rec["Ms"], Gs[j],
                                                   out_cols(layer, targets[j]))):
            if cascade == "sequential":
                Gbar = G + dS[g] @ A.T
                dTg = Gbar @ M @ A
                dAin = W.T @ (dS[g] - dTg) + M @ Gbar.T @ (T - S)
            else:
                dTg = G @ M @ A
                dAin = -W.T @ dTg + M @ G.T @ (T - S)
            dTs.append(dTg)
            dAins.append(dAin[1:] if has_bias else dAin)
        dT[j] = out_image(layer, dTs, targets[j].shape)
        if cascade == "optimistic" and not last:
            dT[j] = dT[j] + dA[j] * (1 - torch.tanh(targets[j]) ** 2)
        if j > 0:
            dA[j - 1] = dA[j - 1] + fold_input(layer, dAins, rec["in_shape"])
    return dT, recs


def test_conv_reference_agrees_with_finite_differences():
    """Guard on the conv reference itself: central differences of the Algorithm 2 + training-pass composition."""
    torch.manual_seed(11)
    net = ConvNet().to(DT)
    gen = torch.Generator().manual_seed(11)
    xbar, x = torch.randn(2, 3, 8, 8, generator=gen, dtype=DT), torch.randn(3, 3, 8, 8, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (3,), generator=gen)
    shapes = [(2, 6, 8, 8), (2, 6, 4, 4), (2, 4, 4, 4), (2, 3)]
    targets = [0.5 * torch.randn(s, generator=gen, dtype=DT) for s in shapes]
    lam = 0.1
    loss_fn = lambda out: F.cross_entropy(out, y)  # noqa: E731
    for cascade in ("sequential", "optimistic"):
        expected, _ = algorithm3_conv(net, targets, xbar, x, lam, cascade, loss_fn)

        def f(ts):
            inp = x
            for layer, rec in zip(net.layers, algorithm2_conv(net, ts, xbar, lam, cascade)):
                out = apply_layer(layer, inp, rec["Ws"])
                inp = torch.tanh(out)
            return loss_fn(out)

        eps = 1e-6
        for j in range(len(targets)):
            idx = torch.randperm(targets[j].numel(), generator=gen)[:12]  # a sample of coordinates per layer
            for i in idx.tolist():
                plus = [t.clone() for t in targets]
                minus = [t.clone() for t in targets]
                plus[j].view(-1)[i] += eps
                minus[j].view(-1)[i] -= eps
                fd = (f(plus) - f(minus)) / (2 * eps)
                assert abs(fd - expected[j].reshape(-1)[i]) < 1e-7 * (1 + expected[j].abs().max()), (cascade, j, i)


@pytest.mark.parametrize("nbar", [5, 2], ids=["primal", "dual-last-conv"])
@pytest.mark.parametrize("cascade", ["sequential", "optimistic"])
def test_conv_target_gradient_matches_algorithm3(nbar, cascade):
    """Conv2d layers with stride, padding, groups and with and without a bias, away from the projected point
    (T ≠ S): the library's dL/dT and realised weights against ``algorithm3_conv`` (F.unfold / F.fold). With
    n̄ = 5 every conv is solved in the primal conv form (``_ConvRidge``); with n̄ = 2 the unbiased conv has
    fewer columns (32) than rows (54) and is solved in the dual form, the strided grouped one still primal."""
    gen = torch.Generator().manual_seed(nbar)
    torch.manual_seed(nbar)
    model = ConvNet().to(DT)
    xbar = torch.randn(nbar, 3, 8, 8, generator=gen, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank deficiency (n̄ = 2) and the size of λ are beside the point here
        tp.to_target_space(model, xbar, lam=0.1, init="random", cascade=cascade)
    with torch.no_grad():
        for layer in model.layers:
            T = layer.parametrizations.weight.original
            T.add_(0.3 * torch.randn(T.shape, generator=gen, dtype=DT))
    x = torch.randn(7, 3, 8, 8, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (7,), generator=gen)
    targets = [layer.parametrizations.weight.original.detach().clone() for layer in model.layers]
    expected, recs = algorithm3_conv(model, targets, xbar, x, 0.1, cascade, lambda out: F.cross_entropy(out, y))

    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for j, layer in enumerate(model.layers):
        got = layer.parametrizations.weight.original.grad
        assert got is not None and got.shape == expected[j].shape, f"layer {j}"
        assert expected[j].norm() > 1e-6, "degenerate test: zero expected gradient"
        assert rel_err(got, expected[j]) < 1e-8, f"layer {j}: dL/dT differs from Algorithm 3"
        # T − S ≠ 0, so the (AAᵀ+λI)⁻¹ … (T − S) term (folded onto the input) is exercised
        assert rel_err(recs[j]["S"], targets[j]) > 1e-3
    with torch.no_grad():
        for j, layer in enumerate(model.layers):
            Ws = recs[j]["Ws"]
            has_bias = layer.bias is not None
            w = torch.cat([W[:, 1:] if has_bias else W for W in Ws], 0).reshape(layer.weight.shape)
            assert rel_err(layer.weight, w) < 1e-9, f"layer {j}: weight differs from Algorithm 2"
            if has_bias:
                assert rel_err(layer.bias, torch.cat([W[:, 0] for W in Ws])) < 1e-9, f"layer {j}: bias"
