"""λ and the scale of activations: ``LambdaScaleWarning``, the ``λ/diag`` column of ``explain`` and
``lam_mode="relative"`` (λ_j = lam × the mean diagonal of layer j's Gram over its input rows, a buffer).

Every reference here is built independently of the library, in float64: patch matrices by ``F.unfold`` (and
``F.pad`` for the other padding modes), eq. 6 by ``torch.linalg.solve`` in the paper's column layout, an
explicit Algorithm 2 (and Algorithm 5 for nn.RNN) differentiated by autograd for Algorithm 3.
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call

import target_param as tp
from target_param.convert import LAM_BUFFER
from target_param.plan import LAMBDA_SCALE_THRESHOLD

DT = torch.float64


# ------------------------------------------------------------------------------------------ references
def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def conv_patches(conv: nn.Conv2d, x):
    """Per-group A (G, C/G·kh·kw, n·P) of a Conv2d on x, columns ordered (n, P), by F.pad + F.unfold."""
    x = F.pad(x, conv._reversed_padding_repeated_twice,
              mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)  # (n, C·k, P)
    n, ck, p = cols.shape
    g = conv.groups
    return cols.reshape(n, g, ck // g, p).permute(1, 2, 0, 3).reshape(g, ck // g, n * p)


def target_columns(t, groups):
    """T (n, C_out, *spatial) or (n, C_out) -> per group (G, C_out/G, n·P), columns ordered (n, P)."""
    n, c = t.shape[:2]
    return t.reshape(n, groups, c // groups, -1).permute(1, 2, 0, 3).reshape(groups, c // groups, -1)


def ridge(a, t, lam, bias):
    """Eq. 6 per group: W = T Aᵀ(AAᵀ + λI)⁻¹ with the ones row appended to A when ``bias``; (G, o, d [+1])."""
    if bias:
        a = torch.cat([a, a.new_ones(a.shape[0], 1, a.shape[2])], 1)
    k = a @ a.mT + lam * torch.eye(a.shape[1], dtype=a.dtype)
    return torch.linalg.solve(k, a @ t.mT).mT  # K symmetric: (K⁻¹ A Tᵀ)ᵀ = T Aᵀ K⁻¹


def mean_diagonal(a):
    """The mean diagonal of the Gram over the input rows, all groups: Σ|A|² / (G·d)."""
    return (a.square().sum() / (a.shape[0] * a.shape[1])).item()


def layer_a(layer, x):
    """(G, d, N) of a Linear (columns = every leading index) or Conv2d on its input x."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1]).T[None]
    return conv_patches(layer, x)


def explicit_weights(layer, x, t, lam):
    """Eq. 6 for a Linear or Conv2d (differentiable in x and t): (weight, bias) shaped like the layer's."""
    a = layer_a(layer, x)
    g = a.shape[0]
    tc = t.reshape(-1, t.shape[-1]).T[None] if isinstance(layer, nn.Linear) else target_columns(t, g)
    w = ridge(a, tc, lam, layer.bias is not None)  # (G, o, d [+1])
    b = w[..., -1].reshape(-1) if layer.bias is not None else None
    w = w[..., :-1] if layer.bias is not None else w
    return w.reshape(layer.weight.shape), b


def inputs_of(model, layers, x):
    """The input of each named layer when ``model(x)`` runs (forward pre-hooks; no_grad)."""
    seen = {}
    handles = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0]))
               for n in layers]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def lam_of(model, name, target="weight"):
    return getattr(model.get_submodule(name).parametrizations, target)[0].lam


def convert(model, ref, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tp.RankDeficientWarning)
        warnings.simplefilter("ignore", tp.LambdaScaleWarning)
        return tp.to_target_space(model, ref, **kw)


# ------------------------------------------------------------------------------------------ models
class ConvNet(nn.Module):
    """Conv (stride, padding, bias) -> Conv (groups, reflect padding, dilation) -> Conv (depthwise, no bias,
    "same") -> Linear; the input of the middle layers is scaled so that the layers' scales differ widely."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(4, 6, 2, groups=2, padding=1, padding_mode="reflect", dilation=(1, 2))
        self.c3 = nn.Conv2d(6, 6, 3, groups=6, padding="same", bias=False)
        self.fc = nn.Linear(6 * 5 * 4, 3)

    def forward(self, x):
        h = torch.tanh(self.c1(x)) * 1e-3
        h = torch.tanh(self.c2(h) * 1e3)
        h = torch.tanh(self.c3(h) * 10)
        return self.fc(h.flatten(1))


CONV_LAYERS = ["c1", "c2", "c3", "fc"]


def conv_setup(seed=0, nbar=12, lam=1e-3, init="random"):
    torch.manual_seed(seed)
    model = ConvNet().to(DT)
    gen = torch.Generator().manual_seed(seed + 1)
    ref = torch.randn(nbar, 3, 8, 7, generator=gen, dtype=DT)
    original = copy.deepcopy(model)
    convert(model, ref, lam=lam, lam_mode="relative", init=init)
    return model, original, ref, gen


class TinyScale(nn.Module):
    """A collapse case: the activations between l1 and l2 are scaled by 1e-6 (as eval-mode BatchNorm at
    fresh statistics does to some timm/torchvision models), then scaled back."""

    def __init__(self, scale=1e-6):
        super().__init__()
        self.scale = scale
        self.l1 = nn.Linear(6, 16)
        self.l2 = nn.Linear(16, 16)
        self.l3 = nn.Linear(16, 4)
        nn.init.zeros_(self.l2.bias)

    def forward(self, x):
        h = torch.tanh(self.l1(x)) * self.scale
        h = torch.tanh(self.l2(h) / self.scale)
        return self.l3(h)


# ------------------------------------------------------------------------------------------ the measurement
@pytest.mark.parametrize("kw", [
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(2, 3), stride=(1, 2), dilation=(2, 1), padding=(1, 0), groups=2),
    dict(kernel_size=3, padding="same", groups=4, padding_mode="reflect"),
    dict(kernel_size=2, padding=1, padding_mode="circular", stride=2, bias=False),
    dict(kernel_size=3, groups=4, padding=2, padding_mode="replicate", dilation=2),
    dict(kernel_size=(4, 2), padding="same", groups=2),  # asymmetric "same" zero padding
])
def test_conv_energy_and_mean_diagonal_match_unfold(kw):
    """The planner's |column|² per group (a conv of the channel-summed x² with a ones kernel, no im2col) and
    the mean diagonal of ``explain`` against F.unfold's patch matrix."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, **kw).to(DT)
    x = torch.randn(3, 4, 7, 9, dtype=DT)
    a = conv_patches(conv, x)  # (G, d, N)
    energy = tp.layers.ConvAdapter(conv).energy(x)  # (N, G)
    torch.testing.assert_close(energy, a.square().sum(1).T, rtol=1e-12, atol=1e-12)
    plan = tp.explain(nn.Sequential(conv), x, lam=0.01)
    diag = mean_diagonal(a)
    (pl,) = plan.layers
    assert pl.mean_diagonals()["weight"] == pytest.approx(diag, rel=1e-12)
    assert pl.stats()["lam_ratio"] == pytest.approx(0.01 / diag, rel=1e-12)


@pytest.mark.parametrize("nd", [1, 3])
def test_conv1d_and_conv3d_energy_match_their_patches(nd):
    """Conv1d against F.unfold of the same input as a 1-row image; Conv3d against the library's im2col
    (validated against a hand-written one in test_eq6)."""
    torch.manual_seed(0)
    if nd == 1:
        conv = nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, padding_mode="circular").to(DT)
        x = torch.randn(3, 4, 11, dtype=DT)
        xp = F.pad(x, conv._reversed_padding_repeated_twice, mode="circular")[:, :, None]
        cols = F.unfold(xp, (1, 3), dilation=(1, 2), stride=(1, 2))  # (n, C·k, P)
        n, ck, p = cols.shape
        a = cols.reshape(n, 2, ck // 2, p).permute(1, 2, 0, 3).reshape(2, ck // 2, n * p)
    else:
        conv = nn.Conv3d(4, 4, (2, 3, 2), stride=(1, 2, 1), padding=(1, 1, 0), groups=4).to(DT)
        x = torch.randn(2, 4, 4, 5, 3, dtype=DT)
        a = tp.layers.ConvAdapter(conv).patches(x).mT
    energy = tp.layers.ConvAdapter(conv).energy(x)
    torch.testing.assert_close(energy, a.square().sum(1).T, rtol=1e-12, atol=1e-12)


def test_explain_shows_lambda_over_diagonal_per_layer():
    torch.manual_seed(0)
    model = TinyScale()
    ref = torch.randn(64, 6)
    a_in = inputs_of(model, ["l1", "l2", "l3"], ref)
    plan = tp.explain(model, ref, lam=1e-4)
    text = str(plan)
    assert "λ/diag" in text.splitlines()[0]
    for pl in plan.layers:
        ratio = 1e-4 / mean_diagonal(layer_a(pl.module, a_in[pl.name]))
        assert pl.stats()["lam_ratio"] == pytest.approx(ratio, rel=1e-5)
    row = next(r for r in text.splitlines() if r.startswith("l2 "))
    assert "!" in row  # above LAMBDA_SCALE_THRESHOLD
    assert "lam_mode='relative'" in text and "l2" in text.splitlines()[-1]
    plan = tp.explain(model, ref, lam=1e-4, lam_mode="relative")
    assert all(pl.stats()["lam_ratio"] == pytest.approx(1e-4) for pl in plan.layers)


# ------------------------------------------------------------------------------------------ the warning
def test_warning_names_the_collapsing_layer_with_its_values():
    torch.manual_seed(0)
    model = TinyScale()
    ref = torch.randn(64, 6)
    a2 = layer_a(model.l2, inputs_of(model, ["l2"], ref)["l2"])
    with pytest.warns(tp.LambdaScaleWarning) as caught:
        tp.to_target_space(model, ref, lam=1e-4)
    (w,) = [w for w in caught if w.category is tp.LambdaScaleWarning]
    lines = str(w.message).splitlines()
    named = [ln for ln in lines if ln.startswith("l2:")]
    assert len(named) == 1 and not any(ln.startswith(("l1:", "l3:")) for ln in lines)
    diag = mean_diagonal(a2)
    assert f"lam {1e-4:.3g}" in named[0] and f"mean diagonal {diag:.3g}" in named[0]
    assert f"ratio {1e-4 / diag:.3g}" in named[0]
    assert "lam_mode='relative'" in str(w.message)


@pytest.mark.parametrize("case", ["normal", "relative"])
def test_no_warning_for_a_normal_case(case):
    torch.manual_seed(0)
    model, kw = (TinyScale(scale=1.0), dict(lam=1e-3)) if case == "normal" else (TinyScale(), dict(
        lam=1e-4, lam_mode="relative"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", tp.LambdaScaleWarning)
        tp.to_target_space(model, torch.randn(64, 6), **kw)


def test_threshold_is_the_documented_one():
    assert LAMBDA_SCALE_THRESHOLD == 0.1
    assert "0.1" in tp.LambdaScaleWarning.__doc__ and "0.1" in tp.to_target_space.__doc__


# ------------------------------------------------------------------------------------------ relative mode
def test_relative_mode_fixes_the_collapse():
    """On the reference batch the projected model (init="project") computes what the original did: λ_j on the
    layer's scale; with the absolute λ the tiny layer's weights are shrunk to nothing."""
    torch.manual_seed(0)
    original = TinyScale().to(DT)
    ref = torch.randn(64, 6, dtype=DT)
    with torch.no_grad():
        y0 = original(ref)
    moves = {}
    for mode in ("absolute", "relative"):  # the same lam: 1e-6 absolute, or 1e-6 of each layer's scale
        model = copy.deepcopy(original)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", tp.LambdaScaleWarning)
            tp.to_target_space(model, ref, lam=1e-6, lam_mode=mode)
        with torch.no_grad():
            moves[mode] = rel(model(ref), y0)
    assert moves["absolute"] > 1e-2, moves
    assert moves["relative"] < 1e-4, moves


def test_relative_lambda_is_lam_times_the_mean_diagonal_at_conversion():
    model, original, ref, _ = conv_setup()
    a_in = inputs_of(original, CONV_LAYERS, ref)
    for name in CONV_LAYERS:
        buf = lam_of(model, name)
        assert buf.dim() == 0 and buf.dtype == DT
        diag = mean_diagonal(layer_a(original.get_submodule(name), a_in[name]))
        assert buf.item() == pytest.approx(1e-3 * diag, rel=1e-10)
    lams = [lam_of(model, n).item() for n in CONV_LAYERS]
    assert max(lams) / min(lams) > 1e3  # the layers' scales differ: one λ would not suit them all


def test_relative_lambda_with_max_positions_is_measured_on_the_chosen_columns():
    """With the approximate option a conv is solved on a fixed subset of its patch columns; its λ_j is lam ×
    the mean diagonal of the Gram over those columns only."""
    torch.manual_seed(0)
    model = ConvNet().to(DT)
    original = copy.deepcopy(model)
    ref = torch.randn(12, 3, 8, 7, generator=torch.Generator().manual_seed(1), dtype=DT)
    convert(model, ref, lam=1e-3, lam_mode="relative", init="random", max_positions=20)
    a_in = inputs_of(original, CONV_LAYERS, ref)
    subsets = 0
    for name in ("c1", "c2", "c3"):
        param = model.get_submodule(name).parametrizations.weight[0]
        a = layer_a(original.get_submodule(name), a_in[name])
        positions = getattr(param, "positions", None)
        if positions is not None:
            assert len(positions) == 20 < a.shape[2]
            a, subsets = a[:, :, positions], subsets + 1
        assert lam_of(model, name).item() == pytest.approx(1e-3 * mean_diagonal(a), rel=1e-10), name
    assert subsets == 3


def test_eq6_with_per_layer_lambda_linear_and_conv():
    """Realised weights = T_j A_jᵀ(A_jA_jᵀ + λ_j I)⁻¹ on each layer's real input in the reference pass (SCU),
    with λ_j read from the layer's buffer."""
    model, _, ref, _ = conv_setup()
    a_in = inputs_of(model, CONV_LAYERS, ref)
    for name in CONV_LAYERS:
        layer = model.get_submodule(name)
        t = layer.parametrizations.weight.original.detach()
        w, b = explicit_weights(layer, a_in[name], t, lam_of(model, name).item())
        assert rel(layer.weight.detach(), w) < 1e-9, name
        if b is not None:
            assert rel(layer.bias.detach(), b) < 1e-9, name


def test_eq6_with_per_layer_lambda_fixed_dual_and_primal_linear():
    """The first layer in the dual form on the reference batch itself (its projections P, Q are computed once
    with λ_j) and a primal Linear after it (K = XᵀX + λ_j I by one addmm onto a kept λ_j I)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT)
    ref = 100 * torch.randn(6, 20, dtype=DT)  # 6 columns < 21 rows: dual
    convert(model, ref, lam=1e-3, lam_mode="relative", init="random")
    assert lam_of(model, "0").item() > 1.0 and lam_of(model, "2").item() < 1e-2
    for _ in range(2):  # cold, then with the first layer's projections cached
        a_in = inputs_of(model, ["0", "2"], ref)
        for name in ("0", "2"):
            layer = model.get_submodule(name)
            w, b = explicit_weights(layer, a_in[name], layer.parametrizations.weight.original.detach(),
                                    lam_of(model, name).item())
            assert rel(layer.weight.detach(), w) < 1e-9 and rel(layer.bias.detach(), b) < 1e-9, name
        with torch.no_grad():
            model[2].parametrizations.weight.original.mul_(1.5)  # realise again, the first layer cached


def test_algorithm3_with_per_layer_lambda():
    """dL/dT of the library against autograd through an explicit float64 Algorithm 2 + 1 with each layer's
    λ_j (SCU: each layer solved on the input the solved layers before it produce)."""
    model, _, ref, gen = conv_setup(nbar=10)
    x = torch.randn(5, 3, 8, 7, generator=gen, dtype=DT)
    r = torch.randn(5, 3, generator=gen, dtype=DT)
    targets = {}
    for name in CONV_LAYERS:  # off the projected point, so that the (T − S) terms are active
        p = model.get_submodule(name).parametrizations.weight.original
        with torch.no_grad():
            p.add_(0.3 * p.std() * torch.randn(p.shape, generator=gen, dtype=DT))
        targets[name] = p.detach().clone().requires_grad_(True)
    lams = {n: lam_of(model, n).item() for n in CONV_LAYERS}

    acts = {"c1": lambda s: torch.tanh(s) * 1e-3, "c2": lambda s: torch.tanh(s * 1e3),
            "c3": lambda s: torch.tanh(s * 10), "fc": lambda s: s}

    def forward(h, weights):
        """The model's forward with the given {name: (weight, bias)} (Algorithm 1)."""
        for name in CONV_LAYERS:
            h = acts[name](explicit_layer(model.get_submodule(name), h.flatten(1) if name == "fc" else h,
                                          *weights[name]))
        return h

    # Algorithm 2 (SCU), explicitly: each layer solved on the input the solved layers before it produce
    weights, h = {}, ref
    for name in CONV_LAYERS:
        m = model.get_submodule(name)
        inp = h.flatten(1) if name == "fc" else h
        weights[name] = explicit_weights(m, inp, targets[name], lams[name])
        h = acts[name](explicit_layer(m, inp, *weights[name]))
    loss = (forward(x, weights) * r).sum()
    expected = torch.autograd.grad(loss, [targets[n] for n in CONV_LAYERS])

    model.zero_grad()
    (model(x) * r).sum().backward()
    for name, e in zip(CONV_LAYERS, expected):
        got = model.get_submodule(name).parametrizations.weight.original.grad
        assert rel(got, e) < 1e-8, name


def explicit_layer(m, h, w, b):
    """A Linear or Conv2d computing with the given weight and bias (its own padding by F.pad)."""
    if isinstance(m, nn.Linear):
        return F.linear(h, w, b)
    h = F.pad(h, m._reversed_padding_repeated_twice,
              mode="constant" if m.padding_mode == "zeros" else m.padding_mode)
    return F.conv2d(h, w, b, m.stride, 0, m.dilation, m.groups)


def test_gradcheck_through_a_relative_mode_net():
    """gradcheck and gradgradcheck (double backward differentiates the plain formula with ctx.lam = λ_j) of
    the model output on a minibatch as a function of the targets, float64."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4, 2))
    model = model.to(DT)
    gen = torch.Generator().manual_seed(1)
    ref = torch.randn(5, 2, 8, generator=gen, dtype=DT) * 30  # a scale where lam and λ_j differ
    x = torch.randn(2, 2, 8, generator=gen, dtype=DT)
    convert(model, ref, lam=0.05, lam_mode="relative", init="random")
    assert lam_of(model, "0").item() > 10 * 0.05
    keys = ["0.parametrizations.weight.original", "3.parametrizations.weight.original"]
    params = dict(model.named_parameters())
    targets = tuple((params[k].detach() + 0.3 * torch.randn(params[k].shape, generator=gen, dtype=DT))
                    .requires_grad_(True) for k in keys)

    def f(*t):
        return functional_call(model, dict(zip(keys, t)), (x,))

    assert gradcheck(f, targets, eps=1e-6, atol=1e-6, rtol=1e-5)
    assert gradgradcheck(f, targets, eps=1e-6, atol=1e-5, rtol=1e-4)
    # with create_graph the backward differentiates the plain formula (ctx.lam): the same gradient
    v = torch.randn(f(*targets).shape, generator=gen, dtype=DT)
    plain = torch.autograd.grad(f(*targets), targets, v)
    graph = torch.autograd.grad(f(*targets), targets, v, create_graph=True)
    for p, g in zip(plain, graph):
        assert rel(g, p) < 1e-9


# ------------------------------------------------------------------------------------------ nn.RNN
class RNNNet(nn.Module):
    def __init__(self, bidirectional):
        super().__init__()
        self.rnn = nn.RNN(3, 4, num_layers=2, batch_first=True, bidirectional=bidirectional)
        self.out = nn.Linear(4 * (2 if bidirectional else 1), 2)

    def forward(self, x):
        return self.out(self.rnn(x * 20)[0])  # the first layer's input is large, the second's is in [-1, 1]


def rnn_reference(rnn, x, targets, lams):
    """Algorithm 5 in float64, time-major, per layer and direction: A = [x(t); tanh(T(t∓1)); 1] (h(−1) = 0),
    W = T Aᵀ(AAᵀ + λI)⁻¹ with that solve's λ; the next layer sees the true states of the solved layer.
    Returns {target name: [W_ih W_hh b]} and the mean diagonal of each solve's Gram over its input rows."""
    sfx = ["", "_reverse"][: 2 if rnn.bidirectional else 1]
    h_in = x.transpose(0, 1)  # (L, B, F)
    L, B, H = h_in.shape[0], h_in.shape[1], rnn.hidden_size
    out, diags = {}, {}
    for k in range(rnn.num_layers):
        states = []
        for d, s in enumerate(sfx):
            name = f"weight_ih_l{k}{s}"
            t = targets[name].transpose(0, 1)  # (L, B, H)
            g = torch.tanh(t)
            zero = torch.zeros(1, B, H, dtype=DT)
            context = torch.cat([g[1:], zero]) if d == 1 else torch.cat([zero, g[:-1]])
            a = torch.cat([h_in, context], -1).reshape(L * B, -1).T  # (F + H, N)
            diags[name] = mean_diagonal(a[None])
            w = ridge(a[None], t.reshape(L * B, H).T[None], lams[name], True)[0]
            out[name] = w
            # the true recurrence with the solved weights
            wi, wh, b = w[:, :h_in.shape[-1]], w[:, h_in.shape[-1]:-1], w[:, -1]
            h, seq = torch.zeros(B, H, dtype=DT), [None] * L
            for step in (range(L - 1, -1, -1) if d == 1 else range(L)):
                h = torch.tanh(h_in[step] @ wi.T + h @ wh.T + b)
                seq[step] = h
            states.append(torch.stack(seq))
        h_in = torch.cat(states, -1)
    return out, diags


@pytest.mark.parametrize("bidirectional", [False, True])
def test_rnn_eq6_with_one_lambda_per_solve(bidirectional):
    torch.manual_seed(0)
    model = RNNNet(bidirectional).to(DT)
    gen = torch.Generator().manual_seed(1)
    ref = torch.randn(6, 5, 3, generator=gen, dtype=DT)
    original = copy.deepcopy(model)
    convert(model, ref, lam=1e-3, lam_mode="relative", init="random")
    rnn = model.rnn
    names = [f"weight_ih_l{k}{s}" for k in range(2) for s in (["", "_reverse"] if bidirectional else [""])]
    lams = {n: getattr(rnn.parametrizations, n)[0].lam.item() for n in names}
    targets = {n: getattr(rnn.parametrizations, n).original.detach() for n in names}
    expected, _ = rnn_reference(rnn, ref * 20, targets, lams)
    for n in names:
        suffix = n.removeprefix("weight_ih_")
        f = rnn.input_size if n.startswith("weight_ih_l0") else rnn.hidden_size * (2 if bidirectional else 1)
        got = torch.cat([getattr(rnn, n), getattr(rnn, f"weight_hh_{suffix}"),
                         getattr(rnn, f"bias_ih_{suffix}")[:, None]], 1).detach()
        assert rel(got, expected[n]) < 1e-9, n
        assert f == expected[n].shape[1] - rnn.hidden_size - 1
    # λ per solve = lam × the mean diagonal of that solve's A at conversion: the original's input and its
    # true states h(t∓1) (with T = S, also the context g(T) of eq. 21), by the original's own recurrence
    diags = original_rnn_diagonals(original.rnn, ref * 20)
    for n in names:
        assert lams[n] == pytest.approx(1e-3 * diags[n], rel=1e-9), n
    assert lams[names[0]] / lams[names[-1]] > 10  # the layers' scales differ: one λ per solve matters


def original_rnn_diagonals(rnn, x):
    """Per solve: the mean diagonal over the input rows of A = [x(t); h(t∓1)] of the unconverted nn.RNN."""
    sfx = ["", "_reverse"][: 2 if rnn.bidirectional else 1]
    h_in = x.transpose(0, 1)
    L, B, H = h_in.shape[0], h_in.shape[1], rnn.hidden_size
    diags = {}
    with torch.no_grad():
        for k in range(rnn.num_layers):
            states = []
            for d, s in enumerate(sfx):
                wi, wh = getattr(rnn, f"weight_ih_l{k}{s}"), getattr(rnn, f"weight_hh_l{k}{s}")
                b = getattr(rnn, f"bias_ih_l{k}{s}") + getattr(rnn, f"bias_hh_l{k}{s}")
                h, seq, prev = torch.zeros(B, H, dtype=DT), [None] * L, [None] * L
                for step in (range(L - 1, -1, -1) if d == 1 else range(L)):
                    prev[step] = h
                    h = torch.tanh(h_in[step] @ wi.T + h @ wh.T + b)
                    seq[step] = h
                a = torch.cat([h_in, torch.stack(prev)], -1).reshape(L * B, -1).T
                diags[f"weight_ih_l{k}{s}"] = mean_diagonal(a[None])
                states.append(torch.stack(seq))
            h_in = torch.cat(states, -1)
    return diags


# ------------------------------------------------------------------------------------------ state
def test_state_dict_round_trip_and_a_loaded_lambda_takes_effect():
    model, _, ref, _ = conv_setup(init="project")
    keys = [k for k in model.state_dict() if k.endswith("." + LAM_BUFFER)]
    assert keys == [f"{n}.parametrizations.weight.0.{LAM_BUFFER}" for n in CONV_LAYERS]
    state = copy.deepcopy(model.state_dict())
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in CONV_LAYERS}

    torch.manual_seed(5)  # another initialisation: other targets and other λ_j before the load
    fresh = ConvNet().to(DT)
    convert(fresh, ref, lam=1e-3, lam_mode="relative")
    assert lam_of(fresh, "c2").item() != lam_of(model, "c2").item()
    with torch.no_grad():
        fresh(ref)  # realised (and the first layer's factor cached) with the fresh λ_j
    fresh.load_state_dict(state)
    fresh.eval()
    with torch.no_grad():
        fresh(ref)
    for n in CONV_LAYERS:
        assert lam_of(fresh, n).item() == lam_of(model, n).item()
        torch.testing.assert_close(fresh.get_submodule(n).weight, weights[n], rtol=1e-12, atol=1e-14)

    # a changed λ_j (loaded) changes the realised weights, to eq. 6 with the new λ_j, the first layer too
    # (whose factor of the fixed reference batch is cached)
    state = copy.deepcopy(fresh.state_dict())
    for n in ("c1", "c2"):
        state[f"{n}.parametrizations.weight.0.{LAM_BUFFER}"] *= 1e4
    fresh.load_state_dict(state)
    with torch.no_grad():
        fresh(ref)
    a_in = inputs_of(fresh, CONV_LAYERS, ref)
    for n in ("c1", "c2"):
        layer = fresh.get_submodule(n)
        assert rel(layer.weight.detach(), weights[n]) > 1e-3, n
        w, _ = explicit_weights(layer, a_in[n], layer.parametrizations.weight.original.detach(),
                                lam_of(fresh, n).item())
        assert rel(layer.weight.detach(), w) < 1e-9, n


def test_lambda_is_read_without_a_synchronisation_per_realisation(monkeypatch):
    model, _, ref, gen = conv_setup()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(4, 3, 8, 7, generator=gen, dtype=DT)
    reads = []
    original = torch.Tensor.__float__
    monkeypatch.setattr(torch.Tensor, "__float__", lambda t: reads.append(t) or original(t))
    monkeypatch.setattr(torch.Tensor, "item", lambda t, _o=torch.Tensor.item: reads.append(t) or _o(t))
    before = tp.realisations(model)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    assert tp.realisations(model) == before + 3
    buffers = {id(lam_of(model, n)) for n in CONV_LAYERS}
    assert not [t for t in reads if id(t) in buffers]
    with torch.no_grad():
        lam_of(model, "c3").mul_(2.0)  # an in-place change is seen
    monkeypatch.undo()
    w, _ = explicit_weights(model.c3, inputs_of(model, ["c3"], ref)["c3"],
                            model.c3.parametrizations.weight.original.detach(), lam_of(model, "c3").item())
    assert rel(model.c3.weight.detach(), w) < 1e-9


def test_to_weight_space_removes_the_buffer_and_restores_the_keys():
    torch.manual_seed(0)
    model = ConvNet().to(DT)
    keys = list(model.state_dict())
    convert(model, torch.randn(6, 3, 8, 7, dtype=DT), lam=1e-3, lam_mode="relative")
    assert any(k.endswith(LAM_BUFFER) for k in model.state_dict())
    tp.to_weight_space(model)
    assert list(model.state_dict()) == keys
    assert not any(b.dim() == 0 for b in model.buffers())


def test_absolute_mode_adds_no_buffer():
    torch.manual_seed(0)
    model = ConvNet().to(DT)
    convert(model, torch.randn(6, 3, 8, 7, dtype=DT), lam=1e-3)
    assert not any(k.endswith("." + LAM_BUFFER) for k in model.state_dict())
    assert not any(LAM_BUFFER in m._buffers for m in model.modules())


@pytest.mark.parametrize("bad", ["Relative", "scaled", None, 1])
@pytest.mark.parametrize("verb", ["to_target_space", "explain"])
def test_bad_lam_mode_is_refused(bad, verb):
    torch.manual_seed(0)
    model = ConvNet()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(tp.InvalidArgumentError, match="lam_mode"):
        getattr(tp, verb)(model, torch.randn(4, 3, 8, 7), lam_mode=bad)
    assert not tp.is_target_space(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_lambda_floor_of_a_dual_solve_with_bias():
    """A layer with a bias solved in the dual form has λ_j ≥ columns × eps (its Gram holds the ones column at
    full scale), and the warning names it in relative mode; without a bias there is no floor."""
    torch.manual_seed(0)
    for bias in (True, False):
        model = nn.Sequential(nn.Linear(40, 3, bias=bias))
        ref = torch.randn(8, 40) * 1e-7  # 8 columns < 41 rows: dual
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tp.to_target_space(model, ref, lam=1e-4, lam_mode="relative")
        lam = lam_of(model, "0").item()
        scaled = 1e-4 * (ref.double().square().sum() / 40).item()
        if bias:
            assert lam == pytest.approx(8 * torch.finfo(torch.float32).eps, rel=1e-6)
            (w,) = [w for w in caught if w.category is tp.LambdaScaleWarning]
            assert any(line.startswith("0:") and "floor" in line for line in str(w.message).splitlines())
        else:
            assert lam == pytest.approx(scaled, rel=1e-5)
            assert not any(w.category is tp.LambdaScaleWarning for w in caught)
        assert math.isfinite(model(ref).sum().item())
