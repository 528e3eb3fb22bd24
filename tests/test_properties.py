"""Property-based tests (hypothesis) of the target-space construction.

Paper convention throughout the helpers: for a layer, ``A`` is (d_in [+1 ones row]) × N with one column per
pattern (per im2col patch for a conv), per group; ``W`` is o × (d_in [+1]) with the bias as last column;
``A^‡ = Aᵀ(AAᵀ + λI)⁻¹`` and ``A^⋄ = A + λ(A⁺)ᵀ``.

Everything is float64. Hypothesis draws a seed for the torch RNG plus the architecture and λ, so each example
is reproducible from the printed falsifying example.

Properties:
  1. init="project" keeps the function, within a tolerance derived from λ and the spectra of the reference Grams.
  2. to_weight_space ∘ to_target_space restores classes, state_dict keys, hooks and buffers.
  3. Weight-space stationary points are target-space stationary points (section 3.5, eq. 11).
  4. eq. 11: dL/dτ = (∂w/∂τ)ᵀ dL/dw (vjp), and the jvp is its adjoint / a finite difference.
  5. Lemma 1: A A^‡ A^⋄ = A (and A^⋄ A^‡ A = A).
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st
from torch import nn

import target_param as tp
from target_param.errors import RankDeficientWarning

DT = torch.float64
EPS = torch.finfo(DT).eps
ACTS = {"tanh": nn.Tanh, "relu": nn.ReLU, "identity": nn.Identity}  # all 1-Lipschitz
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# For the torch.func / after-backward tests a failure does not depend on the drawn model, and shrinking one
# costs ~35 s per test on 2 cores; without shrinking the file stays within its time budget even when they fail.
NO_SHRINK = dict(SETTINGS, phases=[Phase.explicit, Phase.reuse, Phase.generate])

seeds = st.integers(0, 2**31 - 1)
lams = st.floats(-8.0, 0.0).map(lambda e: 10.0**e)  # λ log-uniform in [1e-8, 1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: intra-op threading only adds overhead (tens of ms per conv when the 2 cores are
    shared), so run this module single-threaded and restore the setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ================================================================================= linear-algebra helpers
def patches(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-group A of ``layer`` on input ``x``: (G, d_g [+1], N), paper convention, columns ordered (n, positions).

    Independent of the library: Linear flattens the leading dims, convs use ``F.unfold`` (Conv1d as a 1×k Conv2d).
    """
    if isinstance(layer, nn.Linear):
        a = x.reshape(-1, layer.in_features).T.unsqueeze(0)
    else:
        k, s, p, d = layer.kernel_size, layer.stride, layer.padding, layer.dilation
        if isinstance(layer, nn.Conv1d):
            x, k, s, p, d = x.unsqueeze(2), (1, *k), (1, *s), (0, *p), (1, *d)
        cols = F.unfold(x, k, dilation=d, padding=p, stride=s)  # (n, C·k, L), rows ordered (c, kh, kw)
        n, _, L = cols.shape
        g = layer.groups
        a = cols.reshape(n, g, -1, L).permute(1, 2, 0, 3).reshape(g, -1, n * L)
    if layer.bias is not None:
        a = torch.cat([a, a.new_ones(a.shape[0], 1, a.shape[2])], 1)
    return a


def aug_weight(layer: nn.Module) -> torch.Tensor:
    """Per-group W with the bias as last column: (G, o_g, d_g [+1])."""
    w = layer.weight.detach()
    g = getattr(layer, "groups", 1)
    W = w.reshape(g, w.shape[0] // g, -1)
    if layer.bias is not None:
        W = torch.cat([W, layer.bias.detach().reshape(g, -1, 1)], 2)
    return W


def overlap(layer: nn.Module) -> int:
    """Max number of im2col patches one input element appears in (dilation 1): ∏ ceil(k/s).

    Hence ||unfold(Δx)||_F ≤ sqrt(overlap)·||Δx||_F (zero padding adds nothing)."""
    if isinstance(layer, nn.Linear):
        return 1
    assert all(d == 1 for d in layer.dilation)
    return math.prod(math.ceil(k / s) for k, s in zip(layer.kernel_size, layer.stride))


def spec2(m: torch.Tensor) -> torch.Tensor:
    """Spectral norm of each matrix of a batch."""
    return torch.linalg.matrix_norm(m, ord=2)


def stationary_tol(a: torch.Tensor, lam: float) -> float:
    """Relative size of a float64 gradient that is zero in exact arithmetic: rounding amplified by the
    condition number of K = AAᵀ + λI, κ = (‖A‖₂² + λ)/λ (A^‡ and A^⋄ apply K⁻¹). 1000·ε·κ is 40 times the
    largest ratio seen in 1,000 draws of each stationary-point test (at most 24·ε·κ)."""
    return 1e3 * EPS * float(((spec2(a) ** 2 + lam) / lam).max())


def dagger(a: torch.Tensor, lam: float) -> torch.Tensor:
    """A^‡ = Aᵀ(AAᵀ + λI)⁻¹ (batched), computed by a plain solve, independently of the library."""
    eye = torch.eye(a.shape[-2], dtype=a.dtype)
    return torch.linalg.solve(a @ a.mT + lam * eye, a).mT


def diamond(a: torch.Tensor, lam: float) -> torch.Tensor:
    """A^⋄ = A + λ(A⁺)ᵀ."""
    return a + lam * torch.linalg.pinv(a).mT


def capture_inputs(model: nn.Module, layers, x: torch.Tensor):
    """Run ``model(x)`` (no grad) and return (output, [input of each layer in ``layers``])."""
    got = {}
    hs = [l.register_forward_pre_hook(lambda m, a, i=i: got.__setitem__(i, a[0].detach().clone()))
          for i, l in enumerate(layers)]
    try:
        with torch.no_grad():
            y = model(x)
    finally:
        for h in hs:
            h.remove()
    return y.detach().clone(), [got[i] for i in range(len(layers))]


def conv_layers(model):
    return [m for m in model.modules() if isinstance(m, LAYERS)]


# ================================================================================= model strategies
@st.composite
def mlp_specs(draw, max_width=6, max_depth=3):
    depth = draw(st.integers(1, max_depth))
    return dict(kind="mlp", widths=[draw(st.integers(1, max_width)) for _ in range(depth + 1)],
                act=draw(st.sampled_from(sorted(ACTS))), biases=[draw(st.booleans()) for _ in range(depth)])


@st.composite
def conv_specs(draw):
    nd = draw(st.sampled_from([1, 2]))
    size = size0 = draw(st.integers(4, 8) if nd == 1 else st.integers(3, 5))
    c0 = draw(st.sampled_from([1, 2, 4]))
    convs, c = [], c0
    for _ in range(draw(st.integers(1, 2))):
        g = draw(st.sampled_from([1, 2]))
        g = g if c % g == 0 else 1
        cout = g * draw(st.integers(1, 2))
        k = draw(st.integers(1, min(3, size)))
        s = draw(st.integers(1, 2))
        p = draw(st.integers(0, 1)) if k > 1 else 0
        convs.append(dict(cin=c, cout=cout, k=k, s=s, p=p, g=g, bias=draw(st.booleans())))
        size = (size + 2 * p - k) // s + 1
        c = cout
    return dict(kind="conv", nd=nd, c0=c0, size0=size0, convs=convs, flat=c * size**nd,
                out=draw(st.integers(1, 3)), act=draw(st.sampled_from(sorted(ACTS))),
                head_bias=draw(st.booleans()))


def build(spec, seed):
    """(model in eval mode, float64; input shape without the batch dim)."""
    torch.manual_seed(seed)
    if spec["kind"] == "mlp":
        w, mods = spec["widths"], []
        for i, b in enumerate(spec["biases"]):
            mods += [nn.Linear(w[i], w[i + 1], bias=b), ACTS[spec["act"]]()]
        model, shape = nn.Sequential(*mods[:-1]), (w[0],)
    else:
        Conv = nn.Conv1d if spec["nd"] == 1 else nn.Conv2d
        mods = []
        for c in spec["convs"]:
            mods += [Conv(c["cin"], c["cout"], c["k"], stride=c["s"], padding=c["p"], groups=c["g"],
                          bias=c["bias"]), ACTS[spec["act"]]()]
        mods += [nn.Flatten(), nn.Linear(spec["flat"], spec["out"], bias=spec["head_bias"])]
        model = nn.Sequential(*mods)
        shape = (spec["c0"],) + (spec["size0"],) * spec["nd"]
    return model.to(DT).eval(), shape


@st.composite
def nets(draw):
    """An MLP or a small Conv1d/Conv2d net (stride, padding, groups) with a Linear head."""
    return draw(st.one_of(mlp_specs(), conv_specs()))


def make(spec, seed):
    return build(spec, seed)


def full_rank_ref_size(model, shape, extra):
    """n̄ with n̄ × positions ≥ d_in + 1 + extra for every layer (generically full row rank A)."""
    x = torch.zeros(1, *shape, dtype=DT)
    layers = conv_layers(model)
    _, ins = capture_inputs(model, layers, x)
    need = 1
    for l, xi in zip(layers, ins):
        a = patches(l, xi)
        need = max(need, math.ceil((a.shape[1] + extra) / a.shape[2]))
    return need


# ================================================================================= property 1
@settings(max_examples=60, **SETTINGS)
@given(seed=seeds, lam=lams, kind=st.sampled_from(["linear", "conv1d", "conv2d"]),
       n_ref=st.integers(1, 12), bias=st.booleans(), g=st.sampled_from([1, 2]), k=st.integers(1, 3),
       s=st.integers(1, 2), p=st.integers(0, 1), cin=st.integers(1, 3), cout=st.integers(1, 3))
def test_project_single_layer_realises_W_G_over_G_plus_lam(seed, lam, kind, n_ref, bias, g, k, s, p, cin, cout):
    """One layer, any rank of A: the realised W' is exactly W·G(G+λI)⁻¹ (G = AAᵀ per group) because T = S = WA,
    hence ||W' − W||₂ = λ||W(G+λI)⁻¹||₂ ≤ ||W||₂·λ/(σ_min(G)+λ), and on fresh inputs with patches P̃,
    ||f'(x) − f(x)||_F ≤ ||W' − W||₂·||P̃||_F. The only extra slack is float64 round-off, c·ε·κ(G+λI)."""
    torch.manual_seed(seed)
    if kind == "linear":
        layer, shape = nn.Linear(cin * 2, cout * 2, bias=bias), (cin * 2,)
    else:
        Conv, nd = (nn.Conv1d, 1) if kind == "conv1d" else (nn.Conv2d, 2)
        layer = Conv(cin * g, cout * g, k, stride=s, padding=p, groups=g, bias=bias)
        shape = (cin * g,) + (4,) * nd
    layer = layer.to(DT).eval()
    model = nn.Sequential(layer)  # the property is about the layer, not about a bare-layer root
    ref, fresh = torch.randn(n_ref, *shape, dtype=DT), torch.randn(5, *shape, dtype=DT)
    W = aug_weight(layer)
    A, P = patches(layer, ref), patches(layer, fresh)
    y_old = layer(fresh).detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RankDeficientWarning)
        tp.to_target_space(model, ref, lam=lam)
    W_new = aug_weight(layer)

    G = A @ A.mT
    ev = torch.linalg.eigvalsh(G)  # ascending, ≥ 0 up to round-off
    sig_min = ev[..., 0].clamp_min(0) if A.shape[1] <= A.shape[2] else torch.zeros(A.shape[0], dtype=DT)
    kappa = (ev[..., -1] + lam) / (ev[..., 0].clamp_min(0) + lam)
    round_off = 100 * EPS * kappa * spec2(W) * (1 + A.shape[1])
    note(f"lam={lam:.3g} sig_min={sig_min.tolist()} kappa={kappa.tolist()}")

    expected = W @ G @ torch.linalg.inv(G + lam * torch.eye(G.shape[-1], dtype=DT))
    assert (spec2(W_new - expected) <= round_off + 1e-300).all()
    bound = spec2(W) * lam / (sig_min + lam) + round_off
    assert (spec2(W_new - W) <= bound).all()
    out_bound = bound.max() * P.norm()
    assert (layer(fresh).detach() - y_old).norm() <= out_bound


@settings(max_examples=100, **SETTINGS)
@given(spec=nets(), seed=seeds, lam=lams, extra=st.integers(1, 6))
def test_project_preserves_function_within_derived_bound(spec, seed, lam, extra):
    """init="project" on a Sequential of Linear/Conv layers and 1-Lipschitz activations (tanh, relu, identity,
    flatten), full-rank reference batch, eval mode. The bound is accumulated layer by layer, a priori, from
    quantities of the *unconverted* model (captured with forward pre-hooks):

    Layer j has T = S = W A (A: its input on X̄ before conversion). Under SCU it sees A' = A + ΔA, so
        W' − W = [W ΔA A'ᵀ − λW](A'A'ᵀ + λI)⁻¹,
        ||W' − W||₂ ≤ ||W||₂ (||ΔA||₂ · max_s s/(s²+λ) + λ/(s'_min² + λ)),
    over the singular values s of A', which by Weyl lie in [s_min(A) − ||ΔA||₂, s_max(A) + ||ΔA||₂].
    ||ΔA||_F ≤ sqrt(overlap)·||Δ(layer input)||_F (im2col), and for any input batch (X̄ or fresh X)
        ||ΔS||_F ≤ ||W' − W||₂ (||P̃||_F + ||ΔP||_F) + ||W||₂ ||ΔP||_F,
    which propagates through 1-Lipschitz activations. Groups: block-diagonal, so norms are maxima over groups.
    A float64 round-off term c·ε·κ(A'A'ᵀ+λI) is added per layer."""
    model, shape = make(spec, seed)
    layers = conv_layers(model)
    n_ref = full_rank_ref_size(model, shape, extra)
    gen = torch.Generator().manual_seed(seed + 1)
    ref = torch.randn(n_ref, *shape, dtype=DT, generator=gen)
    fresh = torch.randn(7, *shape, dtype=DT, generator=gen)
    y_ref, ins_ref = capture_inputs(model, layers, ref)
    y_old, ins_fresh = capture_inputs(model, layers, fresh)
    Ws = [aug_weight(l) for l in layers]

    d_ref = d_fresh = 0.0  # bounds on ||Δ(input of layer j)||_F on X̄ and on the fresh batch
    dW_bounds = []
    for l, W, xr, xf in zip(layers, Ws, ins_ref, ins_fresh):
        c = math.sqrt(overlap(l))
        Pr, Pf = patches(l, xr), patches(l, xf)
        e_r, e_f = c * d_ref, c * d_fresh
        sv = torch.linalg.svdvals(Pr)  # (G, min(rows, N))
        s_min = sv[:, -1] if Pr.shape[1] <= Pr.shape[2] else torch.zeros(sv.shape[0], dtype=DT)
        lo, hi = (s_min - e_r).clamp_min(0), sv[:, 0] + e_r
        s_star = torch.minimum(torch.maximum(torch.full_like(lo, math.sqrt(lam)), lo), hi)
        fmax = s_star / (s_star**2 + lam)
        wn = spec2(W)
        kappa = (hi**2 + lam) / (lo**2 + lam)
        round_off = 100 * EPS * wn * (kappa + Pr.norm() * fmax + 1) * (1 + Pr.shape[1])
        E = (wn * (e_r * fmax + lam / (lo**2 + lam)) + round_off).max()
        dW_bounds.append(E)
        Wn = wn.max()
        d_ref = float(E * (Pr.norm() + e_r) + Wn * e_r)
        d_fresh = float(E * (Pf.norm() + e_f) + Wn * e_f)

    tp.to_target_space(model, ref, lam=lam)
    for l, W, E in zip(layers, Ws, dW_bounds):
        assert spec2(aug_weight(l) - W).max() <= E
    with torch.no_grad():
        y_new = model(fresh)
    err = (y_new - y_old).norm().item()
    bound = d_fresh + 100 * EPS * (1 + y_old.norm().item())
    note(f"n_ref={n_ref} lam={lam:.3g} err={err:.3g} bound={bound:.3g}")
    assert err <= bound


# ================================================================================= property 2
@st.composite
def roundtrip_models(draw):
    """Nested containers with Linear/Conv layers, a BatchNorm (buffers) and an unconverted LayerNorm."""
    seed = draw(seeds)
    torch.manual_seed(seed)
    c = draw(st.integers(1, 3))
    conv = nn.Sequential(nn.Conv2d(c, 2 * c, draw(st.integers(1, 3)), padding=1, stride=draw(st.integers(1, 2)),
                                   groups=draw(st.sampled_from([1, c])), bias=draw(st.booleans())))
    if draw(st.booleans()):
        conv.append(nn.BatchNorm2d(2 * c))
    conv.append(nn.ReLU())
    with torch.no_grad():
        flat = conv(torch.zeros(1, c, 5, 5)).numel()
    head = nn.ModuleDict({"fc": nn.Linear(flat, 4, bias=draw(st.booleans())), "ln": nn.LayerNorm(4),
                          "out": nn.Linear(4, draw(st.integers(1, 3)), bias=draw(st.booleans()))})

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = conv, head

        def forward(self, x):
            h = self.head["ln"](self.head["fc"](self.conv(x).flatten(1)))
            return self.head["out"](torch.tanh(h))

    names = ["conv.0", "head.fc", "head.out"]
    chosen = draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True))
    return Net().to(DT).train(draw(st.booleans())), (c, 5, 5), set(chosen)


def _snapshot(model):
    return dict(
        classes=[(n, type(m)) for n, m in model.named_modules()],
        keys=list(model.state_dict().keys()),
        params=[(n, tuple(p.shape), p.requires_grad, type(p)) for n, p in model.named_parameters()],
        buffers=[(n, tuple(b.shape)) for n, b in model.named_buffers()],
        bufsets=[(n, sorted(m._buffers), sorted(m._non_persistent_buffers_set)) for n, m in model.named_modules()],
    )


def _assert_clean(model):
    for n, m in model.named_modules():
        assert not m._forward_pre_hooks, n
        assert not m._forward_hooks, n
        assert not getattr(m, "_forward_hooks_always_called", {}), n
        assert not m._backward_hooks and not m._backward_pre_hooks, n
        assert not hasattr(m, "parametrizations"), n
        assert "_target_space_realiser" not in m.__dict__, n
    assert not tp.is_target_space(model)


@settings(max_examples=60, **SETTINGS)
@given(net=roundtrip_models(), lam=lams, n_ref=st.integers(1, 6), via_copy=st.booleans(),
       train_step=st.booleans())
def test_roundtrip_restores_structure(net, lam, n_ref, via_copy, train_step):
    """to_weight_space(to_target_space(m)) gives back every module's class (identity of type(mod)), the
    state_dict keys in the same order, the same parameters/buffers, and no hooks. Also through a deepcopy of
    the converted model (the original stays converted and working), and after an optimiser step on the
    targets. The weight-space model computes exactly what the target-space model computed."""
    model, shape, chosen = net
    before = _snapshot(model)
    ref = torch.randn(n_ref, *shape, dtype=DT)
    x = torch.randn(3, *shape, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RankDeficientWarning)
        tp.to_target_space(model, ref, lam=lam, filter_fn=lambda m, name: name in chosen)
    assert tp.is_target_space(model)
    if train_step:
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        model(x).square().sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    target = copy.deepcopy(model) if via_copy else model
    with torch.no_grad():
        y_ts = target(x)
    tp.to_weight_space(target)
    after = _snapshot(target)
    for k in ("classes", "keys", "params", "buffers", "bufsets"):
        assert after[k] == before[k], k
    for (n, m0), (_, m1) in zip(before["classes"], after["classes"]):
        assert m0 is m1, n
    _assert_clean(target)
    with torch.no_grad():
        torch.testing.assert_close(target(x), y_ts, rtol=1e-12, atol=1e-12)
    if via_copy:  # the original is untouched by converting the copy back
        assert tp.is_target_space(model)
        with torch.no_grad():
            torch.testing.assert_close(model(x), y_ts, rtol=1e-12, atol=1e-12)
        tp.to_weight_space(model)
        _assert_clean(model)
        assert _snapshot(model) == before


# ================================================================================= property 3
def set_realised(layer: nn.Module, a_ref: torch.Tensor, W_star: torch.Tensor, lam: float):
    """Set the target of a converted ``layer`` so that it realises the (per-group, augmented) W_star exactly:
    T = W* A^⋄ gives W' = W* A^⋄ A^‡ = W* A A⁺ = W* when A has full row rank (Lemma 1's identity)."""
    T = W_star @ diamond(a_ref, lam)  # (G, o_g, N)
    orig = layer.parametrizations.weight.original
    g = T.shape[0]
    if isinstance(layer, nn.Linear):
        new = T[0].T.reshape(orig.shape)
    else:  # columns are ordered (n, positions): back to (n, C_out, *spatial)
        n = orig.shape[0]
        new = T.reshape(g, -1, n, T.shape[2] // n).permute(2, 0, 1, 3).reshape(orig.shape)
    with torch.no_grad():
        orig.copy_(new)


def target_grad_norm(model, x, y):
    model.zero_grad(set_to_none=True)
    loss = 0.5 * (model(x) - y).square().sum()
    loss.backward()
    return math.sqrt(sum(float(p.grad.square().sum()) for p in model.parameters()))


@settings(max_examples=60, **SETTINGS)
@given(seed=seeds, d0=st.integers(1, 4), extra_w=st.lists(st.integers(0, 3), min_size=0, max_size=2),
       out=st.integers(1, 3), bias=st.booleans(), lam=st.floats(-6.0, 0.0).map(lambda e: 10.0**e))
def test_weight_stationary_point_is_target_stationary_deep_linear(seed, d0, extra_w, out, bias, lam):
    """Deep *linear* MLP (widths ≥ d_in, all layers biased or none), converted with any λ.

    Construction of a weight-space stationary point of the converted model's realised weights (rather than
    converting a stationary model, which λ > 0 would move): the hidden layers keep their realised weights
    W'_1..W'_{L-1} (generic, injective since widths ≥ d_in); the last layer's weight is the exact least-squares
    solution W* on the features [h; 1] of the training data. The residual R is then orthogonal to the rows of
    [h; 1], hence (injectivity) to the rows of [X; 1], so dL/dW_j = Bᵀ R ã_{j-1}ᵀ = 0 for *every* layer j.
    The last target is set to T_L = W* A_L^⋄ (A_L: the last layer's realised input on X̄, full row rank), which
    realises W* exactly (A^⋄ A^‡ = A A⁺ = I) without touching the earlier layers (SCU realises forwards).
    Then eq. 11 gives dL/dτ = (∂w/∂τ)ᵀ·0 = 0, which we compare with the gradient at a random target point."""
    torch.manual_seed(seed)
    widths = [d0] + [d0 + e for e in extra_w] + [out]
    model = nn.Sequential(*[nn.Linear(a, b, bias=bias) for a, b in zip(widths[:-1], widths[1:])]).to(DT).eval()
    n_ref = max(widths) + 3
    ref = torch.randn(n_ref, d0, dtype=DT)
    x, y = torch.randn(max(widths) + 6, d0, dtype=DT), torch.randn(max(widths) + 6, out, dtype=DT)
    tp.to_target_space(model, ref, lam=lam)
    last = model[-1]
    (_, (a_ref,)), (_, (h,)) = (capture_inputs(model, [last], ref), capture_inputs(model, [last], x))
    H = patches(last, h)[0]  # (d+1, n)
    W_star = torch.linalg.lstsq(H.T, y).solution.T.unsqueeze(0)  # (1, out, d+1)
    A = patches(last, a_ref)
    set_realised(last, A, W_star, lam)
    torch.testing.assert_close(aug_weight(last), W_star, rtol=1e-8, atol=1e-10)
    g_stat = target_grad_norm(model, x, y)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (p.std() if p.numel() > 1 else 1.0))
    g_rand = target_grad_norm(model, x, y)
    note(f"lam={lam:.3g} |dL/dT| stationary={g_stat:.3g} random={g_rand:.3g}")
    assert g_stat <= stationary_tol(A, lam) * g_rand


@settings(max_examples=60, **SETTINGS)
@given(seed=seeds, nd=st.sampled_from([1, 2]), g=st.sampled_from([1, 2]), cin=st.integers(1, 2),
       cout=st.integers(1, 2), k=st.integers(1, 3), s=st.integers(1, 2), bias=st.booleans(),
       lam=st.floats(-6.0, 0.0).map(lambda e: 10.0**e))
def test_weight_stationary_point_is_target_stationary_conv(seed, nd, g, cin, cout, k, s, bias, lam):
    """A single (grouped, strided) conv layer is linear in its im2col patches, so its weight-space stationary
    point is the per-group least-squares solution on the training patches (exact, via lstsq). We place the
    converted layer there with T = W* A^⋄ (see ``set_realised``) for any λ, and check dL/dT ≈ 0 relative to
    the gradient at a random target point (Theorem direction ∂L/∂w = 0 ⇒ ∂L/∂τ = 0, eq. 11)."""
    torch.manual_seed(seed)
    Conv = nn.Conv1d if nd == 1 else nn.Conv2d
    layer = Conv(cin * g, cout * g, k, stride=s, groups=g, bias=bias).to(DT)
    model = nn.Sequential(layer)
    shape = (cin * g,) + (5,) * nd
    rows = cin * k**nd + bias
    positions = ((5 - k) // s + 1) ** nd
    n_ref = math.ceil((rows + 2) / positions)
    ref = torch.randn(n_ref, *shape, dtype=DT)
    x = torch.randn(n_ref + 2, *shape, dtype=DT)
    y = torch.randn_like(layer(x).detach())
    tp.to_target_space(model, ref, lam=lam)
    Px = patches(layer, x)  # (G, d+1, N)
    Y = y.reshape(y.shape[0], g, cout, -1).permute(1, 0, 3, 2).reshape(g, -1, cout)  # (G, N, o_g)
    W_star = torch.linalg.lstsq(Px.mT, Y).solution.mT
    A = patches(layer, ref)
    set_realised(layer, A, W_star, lam)
    torch.testing.assert_close(aug_weight(layer), W_star, rtol=1e-8, atol=1e-10)
    g_stat = target_grad_norm(model, x, y)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * p.std())
    g_rand = target_grad_norm(model, x, y)
    note(f"lam={lam:.3g} |dL/dT| stationary={g_stat:.3g} random={g_rand:.3g}")
    assert g_stat <= stationary_tol(A, lam) * g_rand


# ================================================================================= property 4
class Realised(nn.Module):
    """forward() returns every converted layer's realised (weight, bias) — reading them realises."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self):
        return tuple(t for l in conv_layers(self.model) for t in (l.weight, l.bias) if t is not None)


def eq11_setup(spec, seed, lam, extra):
    model, shape = make(spec, seed)
    if spec["kind"] == "mlp":  # smooth activations for finite differences
        for i, m in enumerate(model):
            if isinstance(m, nn.ReLU):
                model[i] = nn.Tanh()
    n_ref = full_rank_ref_size(model, shape, extra)
    gen = torch.Generator().manual_seed(seed + 7)
    ref = torch.randn(n_ref, *shape, dtype=DT, generator=gen)
    x = torch.randn(5, *shape, dtype=DT, generator=gen)
    tp.to_target_space(model, ref, lam=lam)
    with torch.no_grad():
        for p in model.parameters():  # move away from T = S so the cascade terms are non-trivial
            p.mul_(1 + 0.3 * torch.rand(p.shape, dtype=DT, generator=gen))
    y = torch.randn_like(model(x).detach())
    model.solve_condition = solve_condition(model, ref, lam)
    return model, x, y


def weight_space_grads(model, x, y):
    """dL/dw with the realised weights held fixed: a deep copy converted back to weight space."""
    ws = copy.deepcopy(model)
    tp.to_weight_space(ws)
    w = tuple(t for l in conv_layers(ws) for t in (l.weight, l.bias) if t is not None)
    loss = 0.5 * (ws(x) - y).square().sum()
    return w, torch.autograd.grad(loss, w)


def solve_condition(model, ref, lam) -> float:
    """The largest condition number of AAᵀ + λI over the converted layers, A their input on the reference
    batch (``patches``, independent of the library). Two algorithms for the same derivative of a solve (the
    analytic backward and double backward through the plain formula) differ by rounding that grows like
    κ²·eps, so that is the honest tolerance of comparisons between them."""
    layers = conv_layers(model)
    _, inputs = capture_inputs(model, layers, ref)
    worst = 1.0
    for layer, a in zip(layers, inputs):
        ev = torch.linalg.eigvalsh(patches(layer, a) @ patches(layer, a).mT)
        worst = max(worst, float(((ev.amax(-1) + lam) / (ev.amin(-1).clamp_min(0) + lam)).max()))
    return worst


def library_target_grads(model, x, y):
    model.zero_grad(set_to_none=True)
    (0.5 * (model(x) - y).square().sum()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def inner(a, b):
    return sum(float((u * v).sum()) for u, v in zip(a, b))


@settings(max_examples=50, **SETTINGS)
@given(spec=nets(), seed=seeds, lam=st.floats(-4.0, 0.0).map(lambda e: 10.0**e), extra=st.integers(1, 4))
def test_eq11_chain_rule_autograd(spec, seed, lam, extra):
    """eq. 11 with plain autograd: build the map τ → w by reading the realised weights with grad enabled,
    vjp it with dL/dw (computed in weight space with the realised weights held fixed) and compare with the
    library's dL/dT from loss.backward(). The jvp (torch.autograd.functional.jvp, double-backward) must be the
    adjoint of the vjp, <v, J u> = <Jᵀ v, u>, and agree with a central finite difference of the map."""
    model, x, y = eq11_setup(spec, seed, lam, extra)
    names, tau = zip(*model.named_parameters())
    w_fixed, dLdw = weight_space_grads(model, x, y)
    w = Realised(model)()  # grad enabled: the realised weights carry the graph back to the targets
    for a, b in zip(w, w_fixed):
        torch.testing.assert_close(a.detach(), b, rtol=1e-12, atol=1e-12)
    vjp = torch.autograd.grad(w, tau, grad_outputs=dLdw, retain_graph=True)

    # adjoint identity and finite difference for J u
    u = [torch.randn_like(t) for t in tau]
    v = [torch.randn_like(t) for t in w]
    Jt_v = torch.autograd.grad(w, tau, grad_outputs=v, retain_graph=True)
    dummy = [torch.zeros_like(t, requires_grad=True) for t in w]
    Jt_dummy = torch.autograd.grad(w, tau, grad_outputs=dummy, create_graph=True)
    Ju = torch.autograd.grad(Jt_dummy, dummy, grad_outputs=u)
    lhs, rhs = inner(v, Ju), inner(Jt_v, u)
    # double backward (plain formula) against the analytic first-order backward: rounding × κ²
    assert abs(lhs - rhs) <= (1e-9 + EPS * model.solve_condition**2) * (1 + abs(lhs) + abs(rhs))

    lib = library_target_grads(model, x, y)  # the library's dL/dT (its own forward + backward)
    for n, gv in zip(names, vjp):
        torch.testing.assert_close(lib[n], gv, rtol=1e-9, atol=1e-9 * (1 + gv.norm().item()))

    h = 1e-5
    with torch.no_grad():
        orig = [t.detach().clone() for t in tau]

        def realised_at(sign):
            for p, o, du in zip(tau, orig, u):
                p.copy_(o + sign * h * du)
            return [t.detach().clone() for t in Realised(model)()]

        wp, wm = realised_at(+1), realised_at(-1)
        for p, o in zip(tau, orig):
            p.copy_(o)
    fd = [(a - b) / (2 * h) for a, b in zip(wp, wm)]
    num = math.sqrt(sum(float((a - b).square().sum()) for a, b in zip(fd, Ju)))
    den = math.sqrt(sum(float(a.square().sum()) for a in Ju))
    note(f"fd rel err {num / max(den, 1e-300):.3g}")
    assert num <= 1e-5 * (1 + den)


@settings(max_examples=15, **NO_SHRINK)
@given(spec=nets(), seed=seeds, lam=st.floats(-4.0, 0.0).map(lambda e: 10.0**e), extra=st.integers(1, 4))
def test_eq11_chain_rule_torch_func(spec, seed, lam, extra):
    """eq. 11 with torch.func: the map τ → w is ``functional_call(Realised(model), targets)``; its vjp with
    dL/dw (weight space, realised weights fixed) must equal the library's dL/dT, and its jvp must be the adjoint
    of the vjp and match a central finite difference."""
    from torch.func import functional_call, jvp, vjp

    model, x, y = eq11_setup(spec, seed, lam, extra)
    wrapper = Realised(model)
    tau = {n: p.detach().clone() for n, p in wrapper.named_parameters()}
    w_fixed, dLdw = weight_space_grads(model, x, y)
    lib = library_target_grads(model, x, y)

    def f(t):
        return functional_call(wrapper, t, ())

    w, vjp_fn = vjp(f, tau)
    for a, b in zip(w, w_fixed):
        # Two solve algorithms (cholesky_solve under torch.func, K⁻¹ products otherwise) agree to rounding
        # times the Gram's condition number κ (1.8e-12 was seen at λ = 3.8e-4).
        tol = 1e-12 + 10 * EPS * model.solve_condition
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    (g_tau,) = vjp_fn(tuple(dLdw))
    for n in tau:
        gv = g_tau[n]
        torch.testing.assert_close(lib[n.removeprefix("model.")], gv, rtol=1e-9, atol=1e-9 * (1 + gv.norm().item()))

    u = {n: torch.randn_like(t) for n, t in tau.items()}
    v = tuple(torch.randn_like(t) for t in w)
    _, Ju = jvp(f, (tau,), (u,))
    (Jt_v,) = vjp_fn(v)
    lhs, rhs = inner(v, Ju), inner([Jt_v[n] for n in tau], [u[n] for n in tau])
    assert abs(lhs - rhs) <= (1e-9 + EPS * model.solve_condition**2) * (1 + abs(lhs) + abs(rhs))
    h = 1e-5
    with torch.no_grad():
        wp = f({n: tau[n] + h * u[n] for n in tau})
        wm = f({n: tau[n] - h * u[n] for n in tau})
    fd = [(a - b) / (2 * h) for a, b in zip(wp, wm)]
    num = math.sqrt(sum(float((a - b).square().sum()) for a, b in zip(fd, Ju)))
    den = math.sqrt(sum(float(a.square().sum()) for a in Ju))
    assert num <= 1e-5 * (1 + den)


@settings(max_examples=5, **NO_SHRINK)
@given(spec=nets(), seed=seeds, lam=st.floats(-4.0, 0.0).map(lambda e: 10.0**e), extra=st.integers(1, 4))
def test_realised_weights_read_after_backward_are_differentiable(spec, seed, lam, extra):
    """Reading ``layer.weight`` outside a forward returns W(τ) with its graph to the targets (that is what the
    map τ → w of eq. 11 is). It must stay differentiable after an unrelated ``loss.backward()`` has freed the
    graph of the previous realisation (e.g. a penalty on the realised weights computed after the main loss),
    and give the same target gradient as when read before that backward."""
    model, x, y = eq11_setup(spec, seed, lam, extra)
    layer = conv_layers(model)[0]
    tau = [p for _, p in model.named_parameters()]
    expected = torch.autograd.grad(layer.weight.square().sum(), tau, allow_unused=True)
    model.zero_grad(set_to_none=True)
    (0.5 * (model(x) - y).square().sum()).backward()
    got = torch.autograd.grad(layer.weight.square().sum(), tau, allow_unused=True)
    for a, b in zip(got, expected):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ================================================================================= property 5
@st.composite
def low_rank_matrices(draw):
    m, n = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    r = draw(st.integers(0, min(m, n)))
    seed = draw(seeds)
    gen = torch.Generator().manual_seed(seed)
    scale = 10.0 ** draw(st.floats(-2, 2))
    a = (torch.randn(m, r, dtype=DT, generator=gen) @ torch.randn(r, n, dtype=DT, generator=gen)) * scale
    return a, r


def library_dagger(a: torch.Tensor, lam: float) -> torch.Tensor:
    """The library's A^‡ (N × d) for A (d × N): a bias-free nn.Linear(d, N) converted on the reference batch Aᵀ,
    with its target set to the identity, realises the weight W = T A^‡ = A^‡ (eq. 6)."""
    d, n = a.shape
    lin = nn.Linear(d, n, bias=False).to(DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank-deficient or ill-conditioned draws are the point here
        tp.to_target_space(lin, a.T.contiguous(), lam=lam)
        with torch.no_grad():
            lin.parametrizations.weight.original.copy_(torch.eye(n, dtype=DT))
            return lin.weight.detach().clone()


@settings(max_examples=300, deadline=None)
@given(ar=low_rank_matrices(), lam=st.floats(-4.0, 2.0).map(lambda e: 10.0**e))
def test_lemma1(ar, lam):
    """Lemma 1 (appendix C): A A^‡ A^⋄ = A for every real A (any shape and rank) and λ > 0, where
    A^‡ = Aᵀ(AAᵀ+λI)⁻¹ and A^⋄ = A + λ(A⁺)ᵀ. (ALGORITHMS.md writes "A^‡ A^⋄ A", which only type-checks for
    square A and is false in general; the SVD proof in the paper multiplies A·A^‡·A^⋄.) The mirrored
    A^⋄ A^‡ A = A holds too, since A^‡A^⋄ = A⁺A and A^⋄A^‡ = AA⁺ (orthogonal projections). A^‡ is the
    library's (``library_dagger``: the weight a converted layer realises); A^⋄ and A⁺ are independent (pinv).
    Hence (Theorem 3) the targets T = W* A^⋄ realise a W with W A = W* A, checked for a random W*.

    Tolerance: with singular values σ, A A^‡ A^⋄ acts as σ·σ/(σ²+λ)·(σ+λ/σ); the pinv of the tiny spurious
    singular values (≈ ε·σ_max) of a numerically rank-deficient product is cut by pinv's rtol, so the error is
    bounded by c·ε·(σ_max + λ/σ_r)·κ-type factors: we use c·ε·(||A|| + λ/σ_r)·(1 + (||A||² + λ)/λ) ."""
    a, r = ar
    dag, dia = library_dagger(a, lam), diamond(a, lam)
    sv = torch.linalg.svdvals(a) if a.numel() else torch.zeros(1, dtype=DT)
    smax = float(sv.max()) if sv.numel() else 0.0
    sr = float(sv[r - 1]) if r > 0 else 1.0
    tol = 1e3 * EPS * (smax + lam / sr + 1) * (1 + (smax**2 + lam) / lam)
    assert (dag - dagger(a, lam)).abs().max() <= tol  # the library's A^‡ is eq. 6's
    assert (a @ dag @ dia - a).abs().max() <= tol
    assert (dia @ dag @ a - a).abs().max() <= tol
    pinv = torch.linalg.pinv(a)
    # the projection identities behind them
    assert (dag @ dia - pinv @ a).abs().max() <= tol
    assert (dia @ dag - a @ pinv).abs().max() <= tol
    # Theorem 3's use: a converted layer given the targets W* A^⋄ acts on A as W* does
    d, n = a.shape
    w_star = torch.randn(3, d, dtype=DT, generator=torch.Generator().manual_seed(d * 8 + n))
    lin = nn.Linear(d, 3, bias=False).to(DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tp.to_target_space(lin, a.T.contiguous(), lam=lam)
        with torch.no_grad():
            lin.parametrizations.weight.original.copy_((w_star @ dia).T)
            w = lin.weight.detach().clone()
    assert (w @ a - w_star @ a).abs().max() <= tol * (1 + float(w_star.abs().sum(1).max()))
