"""nn.RNN in target space (Algorithm 5), checked against an independent float64 implementation written here
from the paper (section 4.3, eq. 19-21).

The reference works time-major, in the paper's column layout (patterns are columns, the row of ones on *top*):
for each layer k and direction, with the targets T(t) (H × n̄) of every reference time step,

    A(t) = [1; x(t); g(T(t−1))]        (reverse direction: g(T(t+1)); the context is 0 at the sequence end)
    [b  W_ih  W_hh] = T Aᵀ (A Aᵀ + λI)⁻¹       one ridge solve over all time steps stacked column-wise

and ``bias_hh`` = 0. The real recurrence is an explicit Python loop over time steps. SCU passes the true hidden
states on (to the next stacked layer and to whatever follows the RNN); OCU passes g(T) on (the module output is
g(T) of the last layer and h_n is g(T) at each layer/direction's final step).

Nothing of the library's own code is used for the reference: only its targets (read from
``rnn.parametrizations.weight_ih_l{k}[_reverse].original``) and its realised tensors / gradients are compared.
"""
from __future__ import annotations

import copy
import itertools
import warnings
import zlib
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck
from torch.func import functional_call
from torch.nn.utils import parametrize

import target_param as tp
from conftest import assert_same_state, model_state

DT = torch.float64
ACT = {"tanh": torch.tanh, "relu": torch.relu}
CASCADES = ["sequential", "optimistic"]


# ------------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class Cfg:
    nl: str = "tanh"
    layers: int = 1
    bidir: bool = False
    bf: bool = True
    bias: bool = True

    @property
    def dirs(self) -> int:
        return 2 if self.bidir else 1

    @property
    def sfx(self) -> list[str]:
        return ["", "_reverse"][: self.dirs]

    def __str__(self) -> str:
        return (f"{self.nl}-L{self.layers}-{'bi' if self.bidir else 'uni'}-{'bf' if self.bf else 'tf'}"
                f"-{'bias' if self.bias else 'nobias'}")


ALL_CFGS = [Cfg(nl, layers, bidir, bf, bias) for nl, layers, bidir, bf, bias in
            itertools.product(["tanh", "relu"], [1, 2], [False, True], [True, False], [True, False])]


def seed_of(*parts) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


def make_rnn(cfg: Cfg, in_size=3, hidden=4) -> nn.RNN:
    return nn.RNN(in_size, hidden, num_layers=cfg.layers, nonlinearity=cfg.nl, bias=cfg.bias,
                  batch_first=cfg.bf, bidirectional=cfg.bidir).to(DT)


def seqs(cfg: Cfg, n, length, features, gen) -> torch.Tensor:
    """n sequences of ``length`` steps in the module's layout."""
    x = torch.randn(n, length, features, generator=gen, dtype=DT)
    return x if cfg.bf else x.transpose(0, 1).contiguous()


def tm(t: torch.Tensor, bf: bool) -> torch.Tensor:
    """Module layout <-> time-major (an involution)."""
    return t.transpose(0, 1) if bf else t


def rnn_target_names(cfg: Cfg) -> list[str]:
    return [f"weight_ih_l{k}{s}" for k in range(cfg.layers) for s in cfg.sfx]


def rnn_targets(rnn: nn.RNN, cfg: Cfg) -> dict[str, torch.Tensor]:
    return {n: rnn.parametrizations[n].original for n in rnn_target_names(cfg)}


def convert(model, ref, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tp.RankDeficientWarning)
        return tp.to_target_space(model, ref, **kw)


def perturb_targets(model: nn.Module, gen, scale=0.5) -> None:
    """Move off the projected point, so that T ≠ S and g(T(t−1)) ≠ the true h(t−1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".original"):
                p.add_(scale * torch.randn(p.shape, generator=gen, dtype=DT))


def rel_err(a, b) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


# ------------------------------------------------------------------------------------------- reference
def ridge(T, A, lam):
    """Eq. 6-7, column layout: ``W = T Aᵀ (A Aᵀ + λI)⁻¹`` (T: out × N, A: rows × N, λ absolute)."""
    gram = A @ A.T + lam * torch.eye(A.shape[0], dtype=A.dtype)
    return torch.linalg.solve(gram, A @ T.T).T


def run_direction(x, w_ih, w_hh, b, g, reverse):
    """``h(t) = g(W_ih x(t) + W_hh h(t∓1) + b)`` from h = 0, explicitly step by step; x is (L, B, F)."""
    h = x.new_zeros(x.shape[1], w_hh.shape[0])
    outs = [None] * x.shape[0]
    for t in (reversed(range(x.shape[0])) if reverse else range(x.shape[0])):
        s = x[t] @ w_ih.T + h @ w_hh.T
        if b is not None:
            s = s + b
        h = g(s)
        outs[t] = h
    return torch.stack(outs), h


def layer_weights(weights, k, s, bias):
    b = weights[f"bias_ih_l{k}{s}"] + weights[f"bias_hh_l{k}{s}"] if bias else None
    return weights[f"weight_ih_l{k}{s}"], weights[f"weight_hh_l{k}{s}"], b


def rnn_forward(weights, x, cfg: Cfg):
    """A plain multi-layer (bi)RNN from a dict of nn.RNN-named tensors; x time-major. Returns (seq, h_n)."""
    g, finals = ACT[cfg.nl], []
    for k in range(cfg.layers):
        outs = []
        for s in cfg.sfx:
            seq, h = run_direction(x, *layer_weights(weights, k, s, cfg.bias), g, reverse=s == "_reverse")
            outs.append(seq)
            finals.append(h)
        x = torch.cat(outs, -1)
    return x, torch.stack(finals)


def algorithm5(targets, xbar, cfg: Cfg, lam, cascade):
    """Algorithm 5 on the reference sequence ``xbar`` (time-major, (n̄_t, n̄, F)).

    ``targets``: nn.RNN target name -> time-major (n̄_t, n̄, H). Returns the realised tensors by nn.RNN name and
    what the RNN passes on in the reference pass (output sequence, h_n): true states (SCU) or g(T) (OCU)."""
    g, weights, finals, inp = ACT[cfg.nl], {}, [], xbar
    for k in range(cfg.layers):
        outs = []
        for s in cfg.sfx:
            reverse = s == "_reverse"
            T = targets[f"weight_ih_l{k}{s}"]
            L, B, H = T.shape
            gT = g(T)
            zero = gT.new_zeros(1, B, H)
            context = torch.cat([gT[1:], zero]) if reverse else torch.cat([zero, gT[:-1]])  # eq. 21
            rows = ([inp.new_ones(L, B, 1)] if cfg.bias else []) + [inp, context]
            A = torch.cat(rows, -1).reshape(L * B, -1).T  # eq. 19-20: every step of every sequence is a column
            W = ridge(T.reshape(L * B, H).T, A, lam)
            o, f = int(cfg.bias), inp.shape[-1]
            weights[f"weight_ih_l{k}{s}"] = W[:, o:o + f]
            weights[f"weight_hh_l{k}{s}"] = W[:, o + f:]
            if cfg.bias:
                weights[f"bias_ih_l{k}{s}"] = W[:, 0]
                weights[f"bias_hh_l{k}{s}"] = W.new_zeros(H)
            if cascade == "sequential":  # Algorithm 5, line 10: the real recurrence with the solved weights
                seq, h = run_direction(inp, *layer_weights(weights, k, s, cfg.bias), g, reverse)
            else:
                seq, h = gT, (gT[0] if reverse else gT[-1])
            outs.append(seq)
            finals.append(h)
        inp = torch.cat(outs, -1)
    return weights, inp, torch.stack(finals)


def linear_input(seq, h_n, cfg: Cfg, head):
    """What the exit Linear sees, as rows in the module's layout order: every step ("seq"), or the last layer's
    final states ("last", from h_n)."""
    if head == "seq":
        seq = tm(seq, cfg.bf)
        return seq.reshape(-1, seq.shape[-1])
    last = h_n[-cfg.dirs:]
    return last.permute(1, 0, 2).reshape(last.shape[1], -1)


class RNNWithExit(nn.Module):
    def __init__(self, cfg: Cfg, head="seq", in_size=3, hidden=4, out=2):
        super().__init__()
        self.cfg, self.head = cfg, head
        self.rnn = make_rnn(cfg, in_size, hidden)
        self.fc = nn.Linear(hidden * cfg.dirs, out).to(DT)

    def forward(self, x):
        out, h_n = self.rnn(x)
        if self.head == "seq":
            return self.fc(out)
        last = h_n[-self.cfg.dirs:]
        return self.fc(last.permute(1, 0, 2).reshape(last.shape[1], -1))


# ------------------------------------------------------------------------------------------- guards
@pytest.mark.parametrize("cfg", [c for c in ALL_CFGS if c.bias or c.nl == "tanh"], ids=str)
def test_reference_forward_is_nn_rnn(cfg):
    """Guard on the test's own explicit recurrence: it is torch's nn.RNN."""
    gen = torch.Generator().manual_seed(seed_of("fwd", cfg))
    torch.manual_seed(seed_of("fwd", cfg))
    rnn = make_rnn(cfg)
    x = seqs(cfg, 3, 7, 3, gen)
    out, h_n = rnn(x)
    seq, h = rnn_forward(dict(rnn.named_parameters()), tm(x, cfg.bf), cfg)
    torch.testing.assert_close(tm(seq, cfg.bf), out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, h_n, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------- 1. weights
@pytest.mark.parametrize("cascade", CASCADES)
@pytest.mark.parametrize("lam", [1e-3, 0.5])
@pytest.mark.parametrize("cfg", ALL_CFGS, ids=str)
def test_realised_weights_match_algorithm5(cfg, lam, cascade):
    gen = torch.Generator().manual_seed(seed_of("w", cfg, lam, cascade))
    torch.manual_seed(seed_of("w", cfg, lam, cascade))
    rnn = make_rnn(cfg)
    xbar = seqs(cfg, 4, 5, 3, gen)  # n̄ = 4 sequences of n̄_t = 5 steps
    convert(rnn, xbar, lam=lam, init="random", cascade=cascade)
    perturb_targets(rnn, gen)
    targets = {n: tm(t.detach(), cfg.bf) for n, t in rnn_targets(rnn, cfg).items()}
    for n, t in targets.items():
        assert t.shape == (5, 4, 4), n
    expected, _, _ = algorithm5(targets, tm(xbar, cfg.bf), cfg, lam, cascade)

    with torch.no_grad():
        assert sorted(expected) == sorted(rnn._flat_weights_names)
        for name in rnn._flat_weights_names:
            got = getattr(rnn, name)
            assert got.shape == expected[name].shape, name
            if name.startswith("bias_hh"):
                assert torch.equal(got, torch.zeros_like(got)), "bias_hh must be realised as zeros"
            else:
                assert expected[name].norm() > 1e-3
                assert rel_err(got, expected[name]) < 1e-9, f"{name} differs from Algorithm 5"
        # the training forward runs with those weights (on a longer sequence)
        x = seqs(cfg, 3, 9, 3, gen)
        out, h_n = rnn(x)
        seq, h = rnn_forward(expected, tm(x, cfg.bf), cfg)
        torch.testing.assert_close(out, tm(seq, cfg.bf), rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(h_n, h, rtol=1e-9, atol=1e-10)


# ------------------------------------------------------------------------------------------- 2. gradients
GRAD_CASES = [
    (Cfg("tanh", 1, False, True, True), "seq"),
    (Cfg("relu", 2, True, False, False), "last"),
    (Cfg("tanh", 2, True, True, True), "last"),
    (Cfg("relu", 1, True, False, True), "seq"),
    (Cfg("tanh", 2, False, False, True), "seq"),
]


def reference_loss(rnn_T, fc_T, xbar, x, yt, cfg, head, lam, cascade):
    """Algorithm 5 + the exit Linear solved on what the RNN passes on + the explicit training forward."""
    weights, seq_ref, hn_ref = algorithm5({n: tm(t, cfg.bf) for n, t in rnn_T.items()}, tm(xbar, cfg.bf), cfg,
                                          lam, cascade)
    a = linear_input(seq_ref, hn_ref, cfg, head)
    A = torch.cat([a.new_ones(1, a.shape[0]), a.T])
    W_fc = ridge(fc_T.reshape(-1, fc_T.shape[-1]).T, A, lam)
    seq, h_n = rnn_forward(weights, tm(x, cfg.bf), cfg)
    z = linear_input(seq, h_n, cfg, head) @ W_fc[:, 1:].T + W_fc[:, 0]
    return ((z - yt) ** 2).sum() / yt.shape[0], weights, W_fc


@pytest.mark.parametrize("cascade", CASCADES)
@pytest.mark.parametrize("lam", [1e-3, 0.5])
@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_target_gradients_match_reference(case, lam, cascade):
    cfg, head = case
    gen = torch.Generator().manual_seed(seed_of("g", cfg, head, lam, cascade))
    torch.manual_seed(seed_of("g", cfg, head, lam, cascade))
    model = RNNWithExit(cfg, head)
    xbar = seqs(cfg, 5, 6, 3, gen)  # n̄_t = 6
    convert(model, xbar, lam=lam, init="random", cascade=cascade)
    perturb_targets(model, gen)
    x = seqs(cfg, 3, 15, 3, gen)  # training sequences are longer than the reference sequence
    rows = 3 * 15 if head == "seq" else 3
    yt = torch.randn(rows, 2, generator=gen, dtype=DT)

    rnn_T = {n: t.detach().clone().requires_grad_(True) for n, t in rnn_targets(model.rnn, cfg).items()}
    fc_T = model.fc.parametrizations.weight.original.detach().clone().requires_grad_(True)
    assert fc_T.shape == ((5, 6, 2) if cfg.bf else (6, 5, 2)) if head == "seq" else (5, 2)
    ref_loss, weights, W_fc = reference_loss(rnn_T, fc_T, xbar, x, yt, cfg, head, lam, cascade)
    expected = torch.autograd.grad(ref_loss, [*rnn_T.values(), fc_T])

    model.zero_grad()
    out = model(x)
    loss = ((out.reshape(-1, 2) - yt) ** 2).sum() / rows
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=0)
    loss.backward()
    got = [model.rnn.parametrizations[n].original.grad for n in rnn_T] + [model.fc.parametrizations.weight.original.grad]
    for name, g, e in zip([*rnn_T, "fc"], got, expected):
        assert g is not None, f"{name}: no gradient"
        assert e.norm() > 1e-8, f"{name}: degenerate test, zero expected gradient"
        assert rel_err(g, e) < 1e-8, f"{name}: dL/dT differs from autograd through the reference"
    with torch.no_grad():  # and the exit layer was solved on the right states
        torch.testing.assert_close(model.fc.bias, W_fc[:, 0], rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(model.fc.weight, W_fc[:, 1:], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("cascade", CASCADES)
def test_exit_layer_sees_true_states_or_optimistic_states(cascade):
    """SCU and OCU give measurably different exit-layer weights (so the gradient test can tell them apart)."""
    cfg, head = Cfg("tanh", 2, True, True, True), "last"
    gen = torch.Generator().manual_seed(11)
    torch.manual_seed(11)
    model = RNNWithExit(cfg, head)
    xbar = seqs(cfg, 5, 6, 3, gen)
    convert(model, xbar, lam=1e-3, init="random", cascade=cascade)
    perturb_targets(model, gen)
    rnn_T = {n: t.detach() for n, t in rnn_targets(model.rnn, cfg).items()}
    fc_T = model.fc.parametrizations.weight.original.detach()
    x, yt = seqs(cfg, 2, 4, 3, gen), torch.zeros(2, 2, dtype=DT)
    _, _, mine = reference_loss(rnn_T, fc_T, xbar, x, yt, cfg, head, 1e-3, cascade)
    other = CASCADES[1 - CASCADES.index(cascade)]
    _, _, theirs = reference_loss(rnn_T, fc_T, xbar, x, yt, cfg, head, 1e-3, other)
    with torch.no_grad():
        assert rel_err(model.fc.weight, mine[:, 1:]) < 1e-9
        assert rel_err(model.fc.weight, theirs[:, 1:]) > 1e-3


# ------------------------------------------------------------------------------------------- 3. gradcheck
@pytest.mark.parametrize("cascade", CASCADES)
@pytest.mark.parametrize("nl", ["tanh", "relu"])
def test_gradcheck_tiny_rnn(nl, cascade):
    cfg = Cfg(nl, 2, True, True, True)
    gen = torch.Generator().manual_seed(seed_of("gc", nl, cascade))
    torch.manual_seed(seed_of("gc", nl, cascade))
    model = RNNWithExit(cfg, "seq", in_size=2, hidden=2, out=1)
    xbar = seqs(cfg, 2, 4, 2, gen)
    convert(model, xbar, lam=0.3, init="random", cascade=cascade)
    x = seqs(cfg, 1, 5, 2, gen)
    keys = [k for k, _ in model.named_parameters()]
    assert len(keys) == 5 and all(k.endswith(".original") for k in keys)
    params = dict(model.named_parameters())
    targets = tuple((params[k].detach() + 0.5 * torch.randn(params[k].shape, generator=gen, dtype=DT))
                    .requires_grad_(True) for k in keys)

    def f(*ts):
        return functional_call(model, dict(zip(keys, ts)), (x,))

    out = f(*targets)
    for k, t in zip(keys, targets):
        g = torch.autograd.grad(out.sum(), t, retain_graph=True)[0]
        assert g.abs().max() > 1e-8, f"output does not depend on {k}"
    assert gradcheck(f, targets, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=False)


# ------------------------------------------------------------------------------------------- 4. submodules
class EmbedRNN(nn.Module):
    """Linear embedding -> RNN -> exit Linear on the last step; only the RNN is converted."""

    def __init__(self, cfg: Cfg):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Linear(3, 4).to(DT)
        self.rnn = make_rnn(cfg, 4, 5)
        self.fc = nn.Linear(5 * cfg.dirs, 2).to(DT)

    def forward(self, x):
        out, _ = self.rnn(torch.tanh(self.embed(x)))
        return self.fc(tm(out, self.cfg.bf)[-1])


@pytest.mark.parametrize("cascade", CASCADES)
@pytest.mark.parametrize("cfg", [Cfg("tanh", 2, True, True, True), Cfg("relu", 2, False, False, True)], ids=str)
def test_submodule_conversion_with_fixed_random_reference(cfg, cascade):
    gen = torch.Generator().manual_seed(seed_of("sub", cfg, cascade))
    torch.manual_seed(seed_of("sub", cfg, cascade))
    model = EmbedRNN(cfg)
    ref_seq = seqs(cfg, 6, 5, 4, gen)  # fixed random input, fed straight into the RNN (section 5.4)
    lam = 0.1
    convert(model.rnn, ref_seq, lam=lam, init="random", cascade=cascade)
    perturb_targets(model, gen)
    assert tp.is_target_space(model) and parametrize.is_parametrized(model.rnn)
    assert not parametrize.is_parametrized(model.embed) and not parametrize.is_parametrized(model.fc)
    assert isinstance(model.embed._parameters["weight"], nn.Parameter)

    x = seqs(cfg, 3, 8, 3, gen)
    yt = torch.randn(3, 2, generator=gen, dtype=DT)
    model.zero_grad()
    loss = ((model(x) - yt) ** 2).sum()
    loss.backward()

    # reference: the RNN's weights depend on its targets and ref_seq only; the rest is ordinary autograd
    rnn_T = {n: t.detach().clone().requires_grad_(True) for n, t in rnn_targets(model.rnn, cfg).items()}
    plain = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()
             if not n.startswith("rnn.")}
    weights, _, _ = algorithm5({n: tm(t, cfg.bf) for n, t in rnn_T.items()}, tm(ref_seq, cfg.bf), cfg, lam, cascade)
    e = torch.tanh(F.linear(x, plain["embed.weight"], plain["embed.bias"]))
    seq, _ = rnn_forward(weights, tm(e, cfg.bf), cfg)
    ref_loss = ((F.linear(seq[-1], plain["fc.weight"], plain["fc.bias"]) - yt) ** 2).sum()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=0)
    expected = torch.autograd.grad(ref_loss, [*rnn_T.values(), *plain.values()])
    params = dict(model.named_parameters())
    names = [f"rnn.parametrizations.{n}.original" for n in rnn_T] + list(plain)
    for name, e_grad in zip(names, expected):
        g = params[name].grad
        assert g is not None and g.abs().max() > 1e-8, f"{name}: no gradient"
        assert rel_err(g, e_grad) < 1e-8, name


class TwoConverted(nn.Module):
    """Two RNNs and an MLP head; each is converted on its own with its own reference batch."""

    def __init__(self):
        super().__init__()
        self.rnn1 = nn.RNN(3, 4, batch_first=True).to(DT)
        self.rnn2 = nn.RNN(4, 3, nonlinearity="relu", bidirectional=True).to(DT)  # time-major
        self.head = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT)

    def forward(self, x):
        a, _ = self.rnn1(x)
        b, _ = self.rnn2(a.transpose(0, 1))
        return self.head(b[-1])


def build_two_converted(cascade, seed=5):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TwoConverted()
    refs = dict(rnn1=torch.randn(5, 6, 3, generator=gen, dtype=DT),
                rnn2=torch.randn(7, 4, 4, generator=gen, dtype=DT),
                head=torch.randn(9, 6, generator=gen, dtype=DT))
    for name, ref in refs.items():
        convert(getattr(model, name), ref, lam=0.2, init="random", cascade=cascade)
    perturb_targets(model, gen)
    return model, refs, gen


@pytest.mark.parametrize("cascade", CASCADES)
def test_two_converted_submodules(cascade):
    model, refs, gen = build_two_converted(cascade)
    lam = 0.2
    assert len(tp.convert.realisers(model)) == 3
    x = torch.randn(3, 8, 3, generator=gen, dtype=DT)
    y = torch.randint(0, 2, (3,), generator=gen)
    model.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()

    c1, c2 = Cfg("tanh", 1, False, True, True), Cfg("relu", 1, True, False, True)
    T = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    assert sorted(T) == sorted(["rnn1.parametrizations.weight_ih_l0.original",
                                "rnn2.parametrizations.weight_ih_l0.original",
                                "rnn2.parametrizations.weight_ih_l0_reverse.original",
                                "head.0.parametrizations.weight.original",
                                "head.2.parametrizations.weight.original"])
    w1, _, _ = algorithm5({"weight_ih_l0": tm(T["rnn1.parametrizations.weight_ih_l0.original"], True)},
                          tm(refs["rnn1"], True), c1, lam, cascade)
    w2, _, _ = algorithm5({"weight_ih_l0": T["rnn2.parametrizations.weight_ih_l0.original"],
                           "weight_ih_l0_reverse": T["rnn2.parametrizations.weight_ih_l0_reverse.original"]},
                          refs["rnn2"], c2, lam, cascade)
    # the head, Algorithm 2 on its own reference batch (columns = patterns)
    a0 = refs["head"].T
    W0 = ridge(T["head.0.parametrizations.weight.original"].T, torch.cat([torch.ones(1, 9, dtype=DT), a0]), lam)
    hidden = W0[:, 1:] @ a0 + W0[:, :1]
    a1 = torch.tanh(T["head.0.parametrizations.weight.original"].T if cascade == "optimistic" else hidden)
    W2 = ridge(T["head.2.parametrizations.weight.original"].T, torch.cat([torch.ones(1, 9, dtype=DT), a1]), lam)

    s1, _ = rnn_forward(w1, x.transpose(0, 1), c1)
    s2, _ = rnn_forward(w2, s1, c2)
    h = torch.tanh(s2[-1] @ W0[:, 1:].T + W0[:, 0])
    ref_loss = F.cross_entropy(h @ W2[:, 1:].T + W2[:, 0], y)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=0)
    expected = torch.autograd.grad(ref_loss, list(T.values()))
    params = dict(model.named_parameters())
    for (name, _), e in zip(T.items(), expected):
        g = params[name].grad
        assert g is not None and e.norm() > 1e-8, name
        assert rel_err(g, e) < 1e-8, name

    # and both come back to weight space with one call
    with torch.no_grad():
        out = model(x)
    tp.to_weight_space(model)
    assert not tp.is_target_space(model) and not tp.convert.realisers(model)
    assert type(model.rnn1) is nn.RNN and type(model.rnn2) is nn.RNN and type(model.head[0]) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(model(x), out, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------- 5. projection
@pytest.mark.parametrize("cascade", CASCADES)
@pytest.mark.parametrize("cfg", [Cfg("tanh", 1, False, True, True), Cfg("tanh", 2, True, False, True),
                                 Cfg("relu", 2, True, True, False), Cfg("relu", 1, False, False, True),
                                 Cfg("tanh", 2, False, True, False)], ids=str)
def test_project_init_preserves_function(cfg, cascade):
    gen = torch.Generator().manual_seed(seed_of("proj", cfg))
    torch.manual_seed(seed_of("proj", cfg))
    model = RNNWithExit(cfg, "seq")
    original = copy.deepcopy(model)
    xbar = seqs(cfg, 12, 6, 3, gen)  # 72 columns ≥ d_in + H + 1 for every layer (at most 8 + 4 + 1)
    # precondition: the true A = [1; x(t); h(t−1)] of every layer has full row rank on the reference (a relu unit
    # that is dead on every reference step would leave its column of W_hh undetermined)
    with torch.no_grad():
        inp = tm(xbar, cfg.bf)
        for k in range(cfg.layers):
            outs = []
            for s in cfg.sfx:
                w = dict(original.rnn.named_parameters())
                seq, _ = run_direction(inp, *layer_weights(w, k, s, cfg.bias), ACT[cfg.nl], s == "_reverse")
                prev = torch.cat([seq[1:], 0 * seq[:1]]) if s else torch.cat([0 * seq[:1], seq[:-1]])
                A = torch.cat([inp, prev] + [torch.ones_like(seq[..., :1])] * cfg.bias, -1)
                A = A.reshape(-1, A.shape[-1])
                assert torch.linalg.matrix_rank(A) == A.shape[1], f"degenerate reference for layer {k}{s}"
                outs.append(seq)
            inp = torch.cat(outs, -1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", tp.RankDeficientWarning)
        tp.to_target_space(model, xbar, lam=1e-10, init="project", cascade=cascade)
    x = seqs(cfg, 4, 11, 3, gen)  # fresh sequences, of another length
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=1e-6, atol=1e-7)
        out, h_n = model.rnn(x)
        out0, h0 = original.rnn(x)
        torch.testing.assert_close(out, out0, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(h_n, h0, rtol=1e-6, atol=1e-7)
        # the weights themselves come back, the two biases merged into bias_ih
        for k in range(cfg.layers):
            for s in cfg.sfx:
                for w in ("weight_ih", "weight_hh"):
                    n = f"{w}_l{k}{s}"
                    torch.testing.assert_close(getattr(model.rnn, n), getattr(original.rnn, n), rtol=1e-4, atol=1e-5)
                if cfg.bias:
                    torch.testing.assert_close(getattr(model.rnn, f"bias_ih_l{k}{s}"),
                                               getattr(original.rnn, f"bias_ih_l{k}{s}")
                                               + getattr(original.rnn, f"bias_hh_l{k}{s}"), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------- 6. realisations
def _check_counts(model, x, converted_roots, settle=False):
    """One reference pass per converted root per grad-enabled forward; none under no_grad."""
    if settle:  # the targets were edited in place since conversion: the next forward realises once
        c = tp.realisations(model)
        with torch.no_grad():
            model(x)
        assert tp.realisations(model) == c + converted_roots
    c0 = tp.realisations(model)
    with torch.no_grad():
        before = model(x)
    assert tp.realisations(model) == c0, "a no_grad forward with nothing changed re-realised"
    for i in range(1, 3):
        out = model(x)
        assert tp.realisations(model) == c0 + i * converted_roots, \
            f"{tp.realisations(model) - c0 - (i - 1) * converted_roots} realisations in one grad-enabled forward"
        out.sum().backward()
    with torch.no_grad():
        a = model(x)
        b = model(x)
    assert tp.realisations(model) == c0 + 2 * converted_roots, "no_grad inference realised again"
    torch.testing.assert_close(b, a, rtol=0, atol=0)  # the very same realised weights
    torch.testing.assert_close(a, before, rtol=1e-12, atol=1e-13)


def test_realisation_once_per_forward_root_model():
    cfg = Cfg("tanh", 2, True, True, True)
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = RNNWithExit(cfg)
    convert(model, seqs(cfg, 4, 5, 3, gen), lam=1e-3, init="random")
    _check_counts(model, seqs(cfg, 2, 9, 3, gen), 1)


def test_realisation_once_per_forward_rnn_is_the_converted_root():
    """``tp.to_target_space(model.rnn, ref_seq)``: the nn.RNN is both the converted layer and the root."""
    cfg = Cfg("tanh", 1, False, True, True)
    gen = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    model = EmbedRNN(cfg)
    convert(model.rnn, seqs(cfg, 4, 5, 4, gen), lam=1e-3, init="random")
    _check_counts(model, seqs(cfg, 2, 9, 3, gen), 1)


def test_realisation_once_per_forward_bare_rnn():
    cfg = Cfg("relu", 1, True, False, True)
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    rnn = make_rnn(cfg)
    convert(rnn, seqs(cfg, 4, 5, 3, gen), lam=1e-3)

    class First(nn.Module):  # out only, so that .sum() works
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x)[0]

    _check_counts(First(rnn), seqs(cfg, 2, 9, 3, gen), 1)


def test_realisation_counts_two_converted_submodules():
    model, _, gen = build_two_converted("sequential")
    _check_counts(model, torch.randn(2, 7, 3, generator=gen, dtype=DT), 3, settle=True)


def test_no_grad_reuses_realised_weights():
    cfg = Cfg("tanh", 2, False, True, True)
    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    model = RNNWithExit(cfg)
    convert(model, seqs(cfg, 4, 5, 3, gen), lam=1e-3, init="random")
    model(seqs(cfg, 2, 6, 3, gen)).sum().backward()
    c = tp.realisations(model)
    with torch.no_grad():
        w = [getattr(model.rnn, n) for n in model.rnn._flat_weights_names]
        for _ in range(3):
            model(seqs(cfg, 2, 7, 3, gen))
        w2 = [getattr(model.rnn, n) for n in model.rnn._flat_weights_names]
    assert tp.realisations(model) == c
    assert all(a is b for a, b in zip(w, w2))
    # an optimiser step changes the targets: the next no_grad forward realises the new weights
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.step()
    with torch.no_grad():
        model(seqs(cfg, 2, 7, 3, gen))
        assert tp.realisations(model) == c + 1
        assert (model.rnn.weight_hh_l0 - w2[1]).abs().max() > 1e-8


# ------------------------------------------------------------------------------------------- 7. round trip
@pytest.mark.parametrize("cascade", CASCADES)
@pytest.mark.parametrize("cfg", [Cfg("tanh", 2, True, True, True), Cfg("relu", 2, True, False, False),
                                 Cfg("tanh", 1, False, False, True)], ids=str)
def test_round_trip_to_weight_space(cfg, cascade):
    gen = torch.Generator().manual_seed(seed_of("rt", cfg, cascade))
    torch.manual_seed(seed_of("rt", cfg, cascade))
    model = RNNWithExit(cfg)
    keys = list(model.state_dict().keys())
    rnn_keys = list(model.rnn.state_dict().keys())
    convert(model, seqs(cfg, 4, 5, 3, gen), lam=0.1, init="random", cascade=cascade)
    perturb_targets(model, gen)
    x = seqs(cfg, 3, 9, 3, gen)
    with torch.no_grad():
        out = model(x)
        o_rnn, h_rnn = model.rnn(x)
        realised = {n: getattr(model.rnn, n).clone() for n in model.rnn._flat_weights_names}
    tp.to_weight_space(model)

    assert type(model.rnn) is nn.RNN and type(model.fc) is nn.Linear
    assert list(model.state_dict().keys()) == keys
    assert list(model.rnn.state_dict().keys()) == rnn_keys
    assert [n for n, _ in model.rnn.named_parameters()] == list(model.rnn._flat_weights_names)
    for m in model.modules():
        assert not parametrize.is_parametrized(m)
        assert not m._forward_pre_hooks and not m._forward_hooks and not m._forward_hooks_always_called
        assert not list(m.buffers(recurse=False))
    assert not tp.is_target_space(model)
    for n, p in model.rnn.named_parameters():
        assert type(p) is nn.Parameter and p.requires_grad, n
        torch.testing.assert_close(p.detach(), realised[n], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), out, rtol=1e-12, atol=1e-12)
        o2, h2 = model.rnn(x)
        torch.testing.assert_close(o2, o_rnn, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(h2, h_rnn, rtol=1e-12, atol=1e-12)
    # a fresh nn.RNN loads it, and it trains as a plain model
    fresh = make_rnn(cfg)
    fresh.load_state_dict(model.rnn.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x)[0], o_rnn, rtol=1e-12, atol=1e-12)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_round_trip_submodule_conversion():
    cfg = Cfg("tanh", 2, True, True, True)
    gen = torch.Generator().manual_seed(9)
    torch.manual_seed(9)
    model = EmbedRNN(cfg)
    keys = list(model.state_dict().keys())
    convert(model.rnn, seqs(cfg, 6, 5, 4, gen), lam=0.1, init="random")
    x = seqs(cfg, 2, 7, 3, gen)
    with torch.no_grad():
        out = model(x)
    tp.to_weight_space(model)
    assert list(model.state_dict().keys()) == keys
    assert type(model.rnn) is nn.RNN
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), out, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------- 8. unsupported
class WithRecurrent(nn.Module):
    """``kind`` (LSTM / GRU) -> nn.RNN -> Linear."""

    def __init__(self, kind):
        super().__init__()
        self.rec = kind(3, 4, batch_first=True)
        self.rnn = nn.RNN(4, 4, batch_first=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        a, _ = self.rec(x)
        b, _ = self.rnn(a)
        return self.fc(b[:, -1])


class CellLoop(nn.Module):
    """A user-written recurrence over nn.RNNCell, then a Linear."""

    def __init__(self):
        super().__init__()
        self.cell = nn.RNNCell(3, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = x.new_zeros(x.shape[0], 4)
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
        return self.fc(h)


UNSUPPORTED = {"LSTM": (lambda: WithRecurrent(nn.LSTM), "rec"),
               "GRU": (lambda: WithRecurrent(nn.GRU), "rec"),
               "RNNCell": (CellLoop, "cell")}


@pytest.mark.filterwarnings("ignore::target_param.errors.TraceFallbackWarning")  # the cell loop is not traceable
@pytest.mark.parametrize("kind", list(UNSUPPORTED))
@pytest.mark.parametrize("init", ["project", "random"])
def test_unsupported_recurrent_layers_refused(kind, init):
    build_fn, bad = UNSUPPORTED[kind]
    torch.manual_seed(0)
    model = build_fn().to(DT)
    ref = torch.randn(4, 5, 3, dtype=DT)
    before = model_state(model)
    with pytest.raises(tp.UnsupportedLayerError) as info:
        tp.to_target_space(model, ref, init=init)
    msg = str(info.value)
    assert "nn.RNN" in msg, msg
    assert bad in msg and kind in msg, msg
    assert_same_state(before, model_state(model))
    assert not tp.is_target_space(model)
    assert all(type(p) is nn.Parameter for p in model.parameters())


@pytest.mark.filterwarnings("ignore::target_param.errors.TraceFallbackWarning")  # the cell loop is not traceable
@pytest.mark.parametrize("kind", list(UNSUPPORTED))
def test_filter_fn_excluding_unsupported_converts_the_rest(kind):
    build_fn, bad = UNSUPPORTED[kind]
    torch.manual_seed(0)
    model = build_fn().to(DT)
    ref = torch.randn(8, 5, 3, dtype=DT)  # the exit Linear sees one column per sequence: n̄ ≥ 4 + 1
    plain = copy.deepcopy(model)
    convert(model, ref, lam=1e-10, init="project", filter_fn=lambda m, name: name != bad)
    bad_mod = getattr(model, bad)
    assert not parametrize.is_parametrized(bad_mod) and type(bad_mod) is type(getattr(plain, bad))
    converted = [n for n, m in model.named_modules() if parametrize.is_parametrized(m)]
    assert converted == (["rnn", "fc"] if kind != "RNNCell" else ["fc"])
    x = torch.randn(3, 7, 3, dtype=DT)
    out = model(x)
    with torch.no_grad():
        torch.testing.assert_close(out, plain(x), rtol=1e-5, atol=1e-6)  # project init: the function is kept
    out.sum().backward()
    for n, p in getattr(model, bad).named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, f"{bad}.{n} got no gradient"
    for n, p in model.named_parameters():
        if n.endswith(".original"):
            assert p.grad is not None, n
