"""The performance paths agree with the plain ones (issue #5): the fx reference graph against the hook
path, the sums S that the solve passes on against X·W, the first layer's cached factor, and the deferred
Cholesky check. Every comparison is in float64 against an independent computation or the other path."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import target_param as tp
from target_param import solver
from target_param.convert import realisers
from target_param.realise import ReferenceCall, lean_max_pool

from conftest import DEVICES, ShortcutMLP, SmallCNN


def _pair(make, ref, **kw):
    """The same model converted twice, with the fx reference graph and without (trace=False: every layer is
    solved by its own forward)."""
    torch.manual_seed(0)
    a = make().double()
    b = copy.deepcopy(a)
    torch.manual_seed(0)  # the same random targets
    tp.to_target_space(a, ref, init="random", **kw)
    torch.manual_seed(0)
    tp.to_target_space(b, ref, init="random", trace=False, **kw)
    return a, b


def _step_grads(model, x):
    model.zero_grad()
    model(x).square().sum().backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("cascade", ["sequential", "optimistic"])
@pytest.mark.parametrize("make,shape", [(ShortcutMLP, (12, 2)), (SmallCNN, (6, 3, 8, 8))], ids=["mlp", "cnn"])
def test_reference_graph_equals_hook_path(make, shape, cascade):
    torch.manual_seed(1)
    ref, x = torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64)
    a, b = _pair(make, ref, lam=1e-2, cascade=cascade)
    ra, rb = realisers(a)[0], realisers(b)[0]
    calls = [m for m in ra.graph_module.modules() if isinstance(m, ReferenceCall)]
    assert len(calls) == len(ra.layers) and rb.graph_module is None
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    a.eval(), b.eval()  # SmallCNN has dropout: compare deterministic forwards
    for ga, gb in zip(_step_grads(a, x), _step_grads(b, x)):
        torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)
    for la, lb in zip(ra.layers, rb.layers):
        torch.testing.assert_close(la.module.weight, lb.module.weight, rtol=1e-10, atol=1e-12)


def test_user_hook_on_converted_layer_still_runs_in_reference_pass():
    """A forward hook added after conversion changes the next layer's input A; the graph path must see it."""
    torch.manual_seed(2)
    ref = torch.randn(16, 2, dtype=torch.float64)
    a, b = _pair(ShortcutMLP, ref, lam=1e-3)
    for m in (a, b):
        m.layers[0].register_forward_hook(lambda mod, args, out: 2 * out)
    with torch.no_grad():
        a(ref), b(ref)  # realise both
    for p, q in zip(a.layers, b.layers):
        torch.testing.assert_close(p.weight, q.weight, rtol=1e-10, atol=1e-12)
    # and the hook matters: without it the next layer's weights differ
    c = copy.deepcopy(a)
    c.layers[0]._forward_hooks.popitem()
    with torch.no_grad():
        c(ref)
    assert not torch.allclose(c.layers[1].weight, a.layers[1].weight)


@pytest.mark.parametrize("trace", [True, False], ids=["graph", "hooks"])
def test_layer_is_solved_from_the_input_it_computes_with(trace):
    """A converted layer carries no hook of its own (its class's forward does the reference-pass work), so
    a user's forward pre-hook that changes the layer's input, added after conversion, is seen by the solve:
    W = T A^‡ (eq. 6, from scratch) with A the changed input, and the layer passes on X·W for it."""
    torch.manual_seed(5)
    ref = torch.randn(30, 2, dtype=torch.float64)
    m = ShortcutMLP().double()
    tp.to_target_space(m, ref, lam=1e-3, init="random", trace=trace)
    assert all(not mod._forward_pre_hooks and not mod._forward_hooks for mod in m.layers)
    m.layers[0].register_forward_pre_hook(lambda mod, args: (2 * args[0],))
    seen = {}
    m.layers[1].register_forward_pre_hook(lambda mod, args: seen.__setitem__("a", args[0].detach().clone()))
    with torch.no_grad():
        m.layers[0].parametrizations.weight.original.add_(0.1)  # stale: the next forward realises
        m(ref)
    w, b = _explicit_first_layer(m, 2 * ref, 1e-3)
    torch.testing.assert_close(m.layers[0].weight, w, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(m.layers[0].bias, b, rtol=1e-9, atol=1e-10)
    expected = torch.cat([ref, torch.tanh(F.linear(2 * ref, w, b))], 1)
    torch.testing.assert_close(seen["a"], expected, rtol=1e-9, atol=1e-10)


def test_channels_last_targets_give_the_nchw_results():
    """New 2-D conv targets are channels_last on the CPU and the reference pass follows their layout; the
    same targets made NCHW give the same realised weights, output and target gradients (float64)."""
    torch.manual_seed(7)
    ref, x = torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.randn(4, 3, 8, 8, dtype=torch.float64)
    a = tp.to_target_space(SmallCNN().double().eval(), ref, lam=1e-2, init="random")
    convs = [m for m in a.modules() if isinstance(m, nn.Conv2d)]
    targets = [m.parametrizations.weight.original for m in convs]
    assert all(t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() for t in targets)
    b = copy.deepcopy(a)
    for m in b.modules():
        if isinstance(m, nn.Conv2d):
            t = m.parametrizations.weight.original
            t.data = t.data.contiguous()
    for ma, mb in zip(a.modules(), b.modules()):
        if isinstance(ma, nn.Conv2d):
            torch.testing.assert_close(ma.weight, mb.weight, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a(x), b(x), rtol=1e-10, atol=1e-12)
    for ga, gb in zip(_step_grads(a, x), _step_grads(b, x)):
        torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-11)


def test_weight_reads_honour_parametrize_cached_and_chained_parametrizations():
    """``layer.weight`` skips parametrize's getter for speed, except under ``parametrize.cached()`` (one
    evaluation per tensor) and when another parametrization is chained after ours."""
    from torch.nn.utils import parametrize

    torch.manual_seed(6)
    ref = torch.randn(20, 2, dtype=torch.float64)
    m = tp.to_target_space(ShortcutMLP().double(), ref, lam=1e-3, init="random")
    lin = m.layers[1]
    with parametrize.cached(), torch.no_grad():
        first = lin.weight
        lin.parametrizations.weight.original.add_(0.1)  # would realise again outside cached()
        assert lin.weight is first
    assert not torch.equal(lin.weight, first)
    plain = lin.weight.detach().clone()

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    parametrize.register_parametrization(lin, "weight", Double(), unsafe=True)
    torch.testing.assert_close(lin.weight, 2 * plain)


@pytest.mark.parametrize("d_in,nbar", [(3, 20), (30, 6)], ids=["primal", "dual"])
@pytest.mark.parametrize("trace", [True, False], ids=["graph", "hooks"])
@pytest.mark.parametrize("lam", [1e-3, 0.0])
def test_sums_passed_on_equal_x_times_w(d_in, nbar, trace, lam):
    """Projection (eq. 13) captures the S each layer passes on; it must be X·W with the realised W, also
    after a Cholesky failure repaired by jitter (λ = 0 and duplicated patterns)."""
    torch.manual_seed(3)
    m = nn.Sequential(nn.Linear(d_in, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    half = torch.randn(nbar // 2, d_in, dtype=torch.float64)
    ref = torch.cat([half, half])  # duplicated rows: XXᵀ is singular in the dual form
    with warnings.catch_warnings():  # λ = 0 warns (IllConditioned), by design
        warnings.simplefilter("ignore")
        tp.to_target_space(m, ref, lam=lam, init="random", trace=trace)
        w = [(m[i].weight.detach().clone(), m[i].bias.detach().clone()) for i in (0, 2)]
        realisers(m)[0].project()  # T ← S: the S that the reference pass passed on
    s1, s2 = (m[i].parametrizations.weight.original for i in (0, 2))
    torch.testing.assert_close(s1, F.linear(ref, *w[0]), rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(s2, F.linear(torch.tanh(s1), *w[1]), rtol=1e-7, atol=1e-7)


def _count_grams(monkeypatch) -> list:
    """The shapes of the Grams formed (both ways a Gram + λI is made: added diagonal, or one addmm)."""
    calls = []
    for name in ("_add_diagonal", "_shifted_gram"):
        original = getattr(solver, name)

        def counting(*args, original=original, **kw):
            out = original(*args, **kw)
            calls.append(tuple(out.shape))
            return out

        monkeypatch.setattr(solver, name, counting)
    return calls


def _explicit_first_layer(model, ref, lam):
    """W = T A^‡ (eq. 6-7) of the first layer, from scratch in float64."""
    lin = model.layers[0]
    a = torch.cat([ref, torch.ones(len(ref), 1, dtype=ref.dtype)], 1)
    t = lin.parametrizations.weight.original
    wt = torch.linalg.solve(a.T @ a + lam * torch.eye(a.shape[1], dtype=a.dtype), a.T @ t)
    return wt[:-1].T, wt[-1]


def test_first_layer_factor_is_cached_and_follows_the_reference(monkeypatch):
    torch.manual_seed(4)
    ref, x = torch.randn(30, 2, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    m = ShortcutMLP().double()
    tp.to_target_space(m, ref, lam=1e-3, init="random")
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    calls = _count_grams(monkeypatch)
    for _ in range(3):
        opt.zero_grad()
        m(x).square().sum().backward()
        opt.step()
    n = len(m.layers)
    # the first grad-enabled pass stores the first layer's factor (a no_grad pass cannot tell a fixed
    # input from one without a graph, so conversion stores none); then every layer but the first
    assert len(calls) == n + 2 * (n - 1), calls
    # and only that layer keeps a copy of its input (memory)
    assert [layer.adapter.cache.input is not None for layer in realisers(m)[0].layers] == [True] + [False] * (n - 1)
    w, b = _explicit_first_layer(m, m.target_space_reference, 1e-3)
    torch.testing.assert_close(m.layers[0].weight, w), torch.testing.assert_close(m.layers[0].bias, b)
    # a changed reference batch (in place: same tensor, new values) is noticed
    with torch.no_grad():
        m.target_space_reference.mul_(1.5)
    calls.clear()
    m(x)
    assert len(calls) == n
    w, b = _explicit_first_layer(m, m.target_space_reference, 1e-3)
    torch.testing.assert_close(m.layers[0].weight, w), torch.testing.assert_close(m.layers[0].bias, b)


class _Plain(nn.Module):
    """The reference batch goes straight into the first layer (its cached factor keys on that very tensor)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(2, 3), nn.Linear(3, 2)])

    def forward(self, x):
        return self.layers[1](torch.tanh(self.layers[0](x)))


def test_cached_factor_of_the_reference_tensor_itself_notices_in_place_changes(monkeypatch):
    ref, x = torch.randn(30, 2, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    m = _Plain().double()
    tp.to_target_space(m, ref, lam=1e-3, init="random")
    m(x).sum().backward()  # a grad-enabled pass stores the first layer's factor
    calls = _count_grams(monkeypatch)
    m(x).sum().backward()
    assert len(calls) == 1  # the second layer only: the first layer's input is the same, unchanged tensor
    with torch.no_grad():
        m.target_space_reference.mul_(1.5)  # in place: the same tensor, a new version
    calls.clear()
    m(x).sum().backward()
    assert len(calls) == 2
    w, b = _explicit_first_layer(m, m.target_space_reference, 1e-3)
    torch.testing.assert_close(m.layers[0].weight, w), torch.testing.assert_close(m.layers[0].bias, b)


def test_forward_on_a_tensor_once_equal_to_the_reference_batch_notices_in_place_changes():
    """The identity of an input found equal to X̄ is remembered with its version: an in-place change of the
    input or of the reference buffer is compared again."""
    ref = torch.randn(10, 3, dtype=torch.float64)
    model = tp.to_target_space(_Counting().double(), ref)
    r = realisers(model)[0]
    x = ref.clone()
    for change, merged in ((None, 1), (None, 1), ("input", 0), ("reference", 1), ("reference", 0)):
        with torch.no_grad():
            if change == "input":
                x.add_(1.0)
            elif change == "reference":
                model.target_space_reference.copy_(x if merged else x - 1.0)
        merges = r.merges
        out = model(x)
        assert r.merges - merges == merged
        with torch.no_grad():
            torch.testing.assert_close(out, model.fc2(torch.tanh(model.fc1(x))))


def test_cached_factor_not_used_when_the_first_input_changes(monkeypatch):
    """Dropout before the first converted layer: its input differs every realisation, so no cache hit."""
    torch.manual_seed(5)
    m = nn.Sequential(nn.Dropout(0.5), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    tp.to_target_space(m, torch.randn(20, 4, dtype=torch.float64), lam=1e-2)
    m.train()
    calls = _count_grams(monkeypatch)
    for _ in range(2):
        m(torch.randn(5, 4, dtype=torch.float64)).sum().backward()
    assert len(calls) == 4


def test_deferred_failure_repeats_carefully_and_stays_careful():
    torch.manual_seed(6)
    x = torch.randn(10, 2)
    lin = nn.Linear(4, 3)
    with pytest.warns(tp.IllConditionedWarning):
        tp.to_target_space(lin, torch.cat([x, x], 1), lam=0.0)
    r = realisers(lin)[0]
    assert r.careful
    assert torch.isfinite(lin.weight).all()
    healthy = nn.Linear(2, 3)
    tp.to_target_space(healthy, x, lam=1e-3)
    assert not realisers(healthy)[0].careful


# ------------------------------------------------------------------ the approximate option (max_positions)
def _explicit_subset_weight(conv: nn.Conv2d, x: Tensor, t: Tensor, positions: Tensor, lam: float):
    """W = T A_sub^‡ (eq. 6) on the chosen im2col columns, built with F.unfold, per group, differentiable."""
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    cols = F.unfold(xp, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)  # (n, C·k, P)
    a = cols.transpose(1, 2).reshape(-1, cols.shape[1])[positions]
    g, cg, og = conv.groups, conv.in_channels // conv.groups, conv.out_channels // conv.groups
    k = conv.kernel_size[0] * conv.kernel_size[1]
    ws, bs = [], []
    for i in range(g):
        ai = torch.cat([a[:, i * cg * k:(i + 1) * cg * k], torch.ones(len(a), 1, dtype=a.dtype)], 1)
        wi = torch.linalg.solve(ai.T @ ai + lam * torch.eye(ai.shape[1], dtype=a.dtype), ai.T @ t[:, i * og:(i + 1) * og])
        ws.append(wi[:-1].T), bs.append(wi[-1])
    return torch.cat(ws).reshape(conv.weight.shape), torch.cat(bs)


@pytest.mark.parametrize("kw", [dict(padding=1), dict(padding=2, dilation=2, groups=2),
                                dict(stride=2, padding=1, padding_mode="reflect")], ids=["same", "dil-g2", "s2-reflect"])
def test_max_positions_solves_eq6_on_the_chosen_columns(kw):
    torch.manual_seed(7)
    conv = nn.Conv2d(4, 6, 3, **kw).double()
    m = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3).double())
    ref, x = torch.randn(6, 4, 9, 9, dtype=torch.float64), torch.randn(3, 4, 9, 9, dtype=torch.float64)
    m(ref)  # materialise the lazy layer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tp.RankDeficientWarning)
        tp.to_target_space(m, ref, lam=1e-2, init="random", max_positions=60)
    t = conv.parametrizations.weight.original
    positions = conv.parametrizations.weight[0].positions
    assert t.shape == (60, 6) and positions.shape == (60,) and len(set(positions.tolist())) == 60
    assert not hasattr(m[3].parametrizations.weight[0], "positions")  # Linear layers stay exact
    w, b = _explicit_subset_weight(conv, ref, t, positions, 1e-2)
    torch.testing.assert_close(conv.weight, w), torch.testing.assert_close(conv.bias, b)
    # the gradient reaching the target is that of the explicit formula
    out = F.conv2d(F.pad(x, conv._reversed_padding_repeated_twice,
                         mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode),
                   w, b, conv.stride, 0, conv.dilation, conv.groups)
    (expected,) = torch.autograd.grad(out.square().sum(), t)
    m.zero_grad()
    conv(x).square().sum().backward()
    torch.testing.assert_close(t.grad, expected)


def test_max_positions_checkpoint_keeps_the_columns_and_options_are_checked():
    torch.manual_seed(8)
    make = lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    ref, x = torch.randn(4, 3, 6, 6), torch.randn(2, 3, 6, 6)
    a = tp.to_target_space(make(), ref, init="random", max_positions=100)
    torch.manual_seed(9)  # another draw of the columns
    b = tp.to_target_space(make(), ref, init="random", max_positions=100)
    pa, pb = (m[0].parametrizations.weight[0].positions for m in (a, b))
    assert not torch.equal(pa, pb)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b[0].parametrizations.weight[0].positions, pa)
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x))
    plan = tp.explain(make(), ref, max_positions=100)
    assert [pl.stats()["cols"] for pl in plan.layers] == [100, 100]
    assert plan.layers[0].stats()["target_shape"] == (100, 4)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(tp.InvalidArgumentError, match="max_positions"):
            tp.to_target_space(make(), ref, max_positions=bad)
    with pytest.raises(tp.InvalidArgumentError, match="sequential"):
        tp.to_target_space(make(), ref, max_positions=10, cascade="optimistic")
    tp.to_weight_space(a)
    assert [k for k in a.state_dict() if "positions" in k] == []


class PoolCNN(nn.Module):
    """Functional and module max pooling, non-overlapping (lean in the reference pass) and overlapping."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 5, 3, padding=1)
        self.c3 = nn.Conv1d(5, 6, 3, padding=1)
        self.pool, self.over = nn.MaxPool2d(2, ceil_mode=True), nn.MaxPool1d(3, 2, 1)
        self.fc = nn.Linear(6 * 13, 3)

    def forward(self, x):
        x = F.max_pool2d(F.leaky_relu(self.c1(x), 0.2), 2)
        x = self.pool(F.leaky_relu(self.c2(x), 0.2))  # 9×9 → 5×5 (ceil)
        x = self.over(F.leaky_relu(self.c3(x.flatten(2)), 0.2))  # 25 → 13, overlapping windows
        return self.fc(x.flatten(1))


def test_reference_pass_max_pooling_is_lean_and_exact():
    """Non-overlapping max pooling in the reference graph keeps only its argmax; gradients and weights
    equal the hook path (the model's own pooling) in float64."""
    torch.manual_seed(2)
    ref, x = torch.randn(6, 3, 18, 18, dtype=torch.float64), torch.randn(5, 3, 18, 18, dtype=torch.float64)
    a, b = _pair(PoolCNN, ref, lam=1e-2)
    code = realisers(a)[0].graph_module.code
    assert code.count("lean_max_pool") == 3 and "max_pool2d(" not in code.replace("lean_max_pool", "")
    for ga, gb in zip(_step_grads(a, x), _step_grads(b, x)):
        torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("nd,kw,lean", [
    (1, dict(kernel_size=2), True),
    (2, dict(kernel_size=2, ceil_mode=True), True),
    (2, dict(kernel_size=(2, 3), padding=1), True),
    (3, dict(kernel_size=2), True),
    (2, dict(kernel_size=3, stride=2, padding=1), False),
    (2, dict(kernel_size=2, dilation=2), False),
])
def test_lean_max_pool_saves_no_input_and_has_max_pool_gradients(nd, kw, lean):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *(7,) * nd, dtype=torch.float64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = lean_max_pool(x, nd, **kw)
    assert any(t.shape == x.shape and t.dtype == x.dtype for t in saved) != lean
    plain = getattr(F, f"max_pool{nd}d")(x, **kw)
    assert torch.equal(out, plain)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(plain, x, g)[0], rtol=0,
                               atol=0)
    assert torch.autograd.gradcheck(lambda t: lean_max_pool(t, nd, **kw), (x,))


class BNNet(nn.Module):
    def __init__(self, drop=None, functional_dropout=False):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)
        self.drop = nn.Dropout(drop) if drop is not None else nn.Identity()
        self.functional_dropout = functional_dropout

    def forward(self, x, scale=1.0):
        h = self.drop(torch.tanh(self.bn(self.fc1(x))))
        if self.functional_dropout:
            h = F.dropout(h, 0.5, self.training)
        return self.fc2(h) * scale


def test_forward_on_the_reference_batch_reuses_the_reference_pass():
    """X = X̄ under SCU: the forward returns the reference pass's output (one forward with a graph, one
    backward). Its value, the gradients and BatchNorm's running statistics equal the two-pass computation."""
    torch.manual_seed(3)
    ref = torch.randn(20, 3, dtype=torch.float64)
    a = BNNet().double()
    tp.to_target_space(a, ref, init="random")
    b = copy.deepcopy(a)
    realisers(b)[0].is_reference_call = lambda args, kwargs: False  # the two-pass computation
    results = []
    for m in (a, b):
        m.zero_grad()
        out = m(ref.clone())  # equal values suffice
        assert torch.is_grad_enabled()
        out.square().sum().backward()
        results.append((out.detach(), [p.grad for p in m.parameters()], [t.clone() for t in m.bn.buffers()]))
    assert realisers(a)[0].merges == 1 and realisers(b)[0].merges == 0
    (oa, ga, ba), (ob, gb, bb) = results
    torch.testing.assert_close(oa, ob, rtol=1e-10, atol=1e-12)
    for u, v in zip(ga + ba, gb + bb):
        torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("case", ["other input", "keyword", "optimistic", "dropout", "functional dropout",
                                  "no graph", "no grad"])
def test_reference_pass_is_not_reused_when_the_forward_differs(case):
    torch.manual_seed(4)
    ref = torch.randn(20, 3, dtype=torch.float64)
    model = BNNet(drop=0.5 if case == "dropout" else None, functional_dropout=case == "functional dropout").double()
    tp.to_target_space(model, ref, init="random", cascade="optimistic" if case == "optimistic" else "sequential",
                       trace=case != "no graph")
    r = realisers(model)[0]
    x = ref + 1 if case == "other input" else ref
    with torch.set_grad_enabled(case != "no grad"):
        out = model(x, scale=2.0) if case == "keyword" else model(x)
    assert r.merges == 0 and torch.is_grad_enabled()
    if case == "keyword":  # the keyword reached the forward
        assert torch.allclose(out, 2 * model.fc2(torch.tanh(model.bn(model.fc1(x)))))
    if case == "dropout":  # in eval mode there is nothing random left: reused
        model.eval()
        model(ref)
        assert r.merges == 1


class _Counting(nn.Module):
    """Counts its forwards (a Python side effect that no fx graph records); raises on demand."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.forwards, self.boom = nn.Linear(3, 4), nn.Linear(4, 2), 0, False

    def forward(self, x):
        self.forwards += 1
        h = torch.tanh(self.fc1(x))
        if self.boom:
            raise RuntimeError("boom")
        return self.fc2(h)


@pytest.mark.parametrize("trace", [True, False], ids=["graph", "hooks"])
def test_weight_read_after_backward_realises_only_when_the_graph_was_freed(trace):
    """A grad-enabled read of ``layer.weight`` outside forward reuses the realised tensor while its graph is
    intact (no backward yet, or ``retain_graph=True``), and realises again once a backward freed it; either
    way the tensor it returns can be backpropagated."""
    torch.manual_seed(8)
    ref = torch.randn(12, 3, dtype=torch.float64)
    model = tp.to_target_space(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double(), ref,
                               trace=trace)
    x = torch.randn(5, 3, dtype=torch.float64)
    for retain, again in ((True, 0), (False, 1)):
        out = model(x)
        n = tp.realisations(model)
        model[2].weight.sum().backward(retain_graph=True)  # the forward's own weights: no realisation
        assert tp.realisations(model) == n
        out.sum().backward(retain_graph=retain)
        w = model[2].weight
        assert tp.realisations(model) == n + again
        w.sum().backward()  # differentiable either way


def test_forward_on_the_reference_batch_runs_the_model_once():
    """X = X̄: the model's own forward is the reference pass, so it runs exactly once per call (its Python
    side effects happen once, as in weight space); on any other input it runs once too (the reference
    pass then runs the fx graph)."""
    ref = torch.randn(10, 3)
    model = tp.to_target_space(_Counting(), ref)
    r = realisers(model)[0]
    for x, merged in ((ref, 1), (ref + 1, 0), (ref.clone(), 1)):
        before, merges = model.forwards, r.merges
        model(x).sum().backward()
        assert model.forwards - before == 1 and r.merges - merges == merged and r.phase == "idle"


def test_forward_on_the_reference_batch_that_raises_leaves_nothing_half_done():
    torch.manual_seed(5)
    ref = torch.randn(10, 3)
    model = tp.to_target_space(_Counting(), ref)
    r = realisers(model)[0]
    weight = model.fc1.weight.detach().clone()
    with torch.no_grad():
        model.fc1.parametrizations.weight.original.add_(1.0)  # the targets changed: a realisation is due
    model.boom = True
    with pytest.raises(RuntimeError, match="boom"):
        model(ref)
    assert r.phase == "idle" and not r.inline and r.pending is None and r.solves is None
    assert torch.is_grad_enabled()
    model.boom = False
    before = r.merges
    model(ref).sum().backward()  # works, and realises from the changed targets
    assert model.fc1.parametrizations.weight.original.grad is not None and r.merges == before + 1
    assert not torch.allclose(model.fc1.weight, weight)


@pytest.mark.parametrize("width", [4, 40])  # K⁻¹ by triangular solves (d ≤ 32) or by LAPACK, which raises
def test_forward_on_the_reference_batch_repeats_carefully_after_a_failed_factor(width):
    """A Cholesky failure found at the end of a forward that was the reference pass: the pass is repeated
    carefully (float64, a warning), and the forward returns that pass's output, with its gradient."""
    torch.manual_seed(7)
    ref = torch.randn(100, 3)
    model = nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 2))
    tp.to_target_space(model, ref, lam=0.0)
    r = realisers(model)[0]
    assert not r.careful
    with torch.no_grad():  # zero targets: zero weights, a zero input of the second layer, a singular Gram
        model[0].parametrizations.weight.original.zero_()
    merges = r.merges
    with pytest.warns(tp.IllConditionedWarning, match="'2'"):
        out = model(ref)
    assert r.careful and r.merges == merges + 1 and r.phase == "idle"
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(out, model(ref.clone()))  # the realised weights' own output


def test_forward_on_the_reference_batch_is_not_merged_under_a_root_pre_hook():
    """A forward pre-hook of the root (registered after conversion) may change the input the forward sees,
    so the forward is not taken as the reference pass; the output is the pre-hook's input's."""
    ref = torch.randn(10, 3, dtype=torch.float64)
    model = tp.to_target_space(_Counting().double(), ref)
    r = realisers(model)[0]
    model.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    out = model(ref)
    assert r.merges == 0
    torch.testing.assert_close(out, model.fc2(torch.tanh(model.fc1(2 * ref))))


def _dual_first_layer_mlp(seed=6):
    torch.manual_seed(seed)
    ref = torch.randn(10, 30, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(30, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tp.RankDeficientWarning)
        tp.to_target_space(model, ref, lam=1e-2, init="random")
    return model, ref


def test_fixed_dual_first_layer_uses_projections_and_equals_the_solve():
    """A first layer in the dual form (d_in + 1 = 31 > n̄ = 10) whose input is the reference batch itself is
    solved by W = PY, S = Y − QY (P, Q precomputed in float64): the weights must equal eq. 23 solved from
    scratch, the sums it passes on X·W (eq. 13 sets T ← S), and dL/dT the plain autograd of eq. 23."""
    model, ref = _dual_first_layer_mlp()
    x = torch.randn(7, 30, dtype=torch.float64)
    model(x).square().sum().backward()
    assert realisers(model)[0].layers[0].adapter.cache.entry[0] == "projections"
    one = torch.cat([ref, torch.ones(10, 1, dtype=ref.dtype)], 1)
    t = model[0].parametrizations.weight.original
    wt = one.T @ torch.linalg.solve(one @ one.T + 1e-2 * torch.eye(10, dtype=ref.dtype), t)  # eq. 23
    torch.testing.assert_close(model[0].weight, wt[:-1].T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model[0].bias, wt[-1], rtol=1e-10, atol=1e-12)

    # dL/dT of the whole model against the same computation by plain autograd through eq. 23 (layer 1,
    # fixed input) and eq. 7/23 (layer 2, whose input depends on layer 1's targets)
    t1, t2 = (m.parametrizations.weight.original for m in (model[0], model[2]))
    tt1, tt2 = t1.detach().clone().requires_grad_(), t2.detach().clone().requires_grad_()
    w1 = solver.ridge_autograd(one, tt1, 1e-2, "0")
    a1 = torch.tanh(one @ w1)
    w2 = solver.ridge_autograd(torch.cat([a1, torch.ones(10, 1, dtype=ref.dtype)], 1), tt2, 1e-2, "2")
    h = torch.tanh(x @ w1[:-1] + w1[-1])
    (h @ w2[:-1] + w2[-1]).square().sum().backward()
    torch.testing.assert_close(t1.grad, tt1.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(t2.grad, tt2.grad, rtol=1e-8, atol=1e-10)

    w, bias = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    with torch.no_grad():
        realisers(model)[0].project()  # T ← S, the S the first layer passes on
    torch.testing.assert_close(t1, F.linear(ref, w, bias), rtol=1e-9, atol=1e-10)


def test_fixed_dual_first_layer_does_not_depend_on_the_cache():
    """The projections are the layer's only path, so a warm model (cache filled, trained) and a fresh copy
    loading its state_dict realise bit-identical weights, under grad and under no_grad."""
    model, ref = _dual_first_layer_mlp(seed=7)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 30, dtype=torch.float64)).square().sum().backward()
        opt.step()
    fresh, _ = _dual_first_layer_mlp(seed=8)
    fresh.load_state_dict(model.state_dict())
    probe = torch.randn(4, 30, dtype=torch.float64)
    assert torch.equal(fresh(probe), model(probe))
    with torch.no_grad():
        other, _ = _dual_first_layer_mlp(seed=9)
        other.load_state_dict(model.state_dict())
        assert torch.equal(other(probe), model(probe))
        assert torch.equal(other[0].weight, model[0].weight) and torch.equal(other[2].bias, model[2].bias)


def test_projections_are_recomputed_when_the_reference_batch_changes():
    """An in-place edit of the reference batch invalidates the precomputed projections (eq. 23 again)."""
    model, ref = _dual_first_layer_mlp(seed=10)
    model(ref).sum().backward()
    buf = realisers(model)[0].reference_inputs()[0]
    with torch.no_grad():
        buf.mul_(0.5)
    model.zero_grad()
    model(torch.randn(3, 30, dtype=torch.float64)).sum().backward()
    one = torch.cat([buf, torch.ones(10, 1, dtype=buf.dtype)], 1)
    t = model[0].parametrizations.weight.original
    wt = one.T @ torch.linalg.solve(one @ one.T + 1e-2 * torch.eye(10, dtype=buf.dtype), t)
    torch.testing.assert_close(model[0].weight, wt[:-1].T, rtol=1e-10, atol=1e-12)


def _sync_model(seed):
    """A first layer in the inverse path (d_in + 1 = 9, solved through K⁻¹), a wide one in the
    cholesky_solve path (d + 1 = 101 > 64 and > 2 × 10 outputs), a conv layer (_ConvRidge)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(12, 100), nn.Tanh(),
                          nn.Linear(100, 10)).double()
    tp.to_target_space(model, torch.randn(200, 2, 4, dtype=torch.float64), lam=1e-2, init="random")
    return model


def _train_step(model, x):
    model.zero_grad()
    model(x).square().sum().backward()
    return [p.grad.clone() for p in model.parameters()]


def test_sync_free_solves_equal_lapack_and_leave_one_synchronisation(monkeypatch):
    """On devices in SYNC_FREE_DEVICES (CUDA) K⁻¹ and K⁻¹B come from triangular solves, because LAPACK's
    cholesky_inverse/cholesky_solve synchronise with the host to check their info flags. Forced on the CPU
    here: same weights and target gradients as the LAPACK routines (float64), and a whole training step
    (realisation, forward, backward) then synchronises exactly once (Realiser._check)."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(7, 2, 4, dtype=torch.float64)
    lapack = _sync_model(3)
    free = copy.deepcopy(lapack)
    expected = _train_step(lapack, x)
    monkeypatch.setattr(solver, "SYNC_FREE_DEVICES", {"cpu"})
    got = _train_step(free, x)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
    for a, b in zip(lapack.modules(), free.modules()):
        if isinstance(a, (nn.Linear, nn.Conv1d)):
            torch.testing.assert_close(b.weight, a.weight, rtol=1e-8, atol=1e-10)

    def syncs(step):
        """Host synchronisations: scalar reads (``item``, ``bool``: aten::_local_scalar_dense) and ``tolist``
        calls (a device-to-host copy on CUDA; no aten op on the CPU, so counted by a wrapper)."""
        lists = []
        tolist = torch.Tensor.tolist
        monkeypatch.setattr(torch.Tensor, "tolist", lambda t: lists.append(1) or tolist(t))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        monkeypatch.setattr(torch.Tensor, "tolist", tolist)
        return len(lists) + sum(e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense")

    assert syncs(lambda: _train_step(free, x)) == 1
    monkeypatch.setattr(solver, "SYNC_FREE_DEVICES", set())
    assert syncs(lambda: _train_step(free, x)) > 1  # LAPACK's checks: the count above can fail


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [(), (2,)], ids=["matrix", "batched"])
@pytest.mark.parametrize("upper", [False, True], ids=["lower", "upper"])
def test_triangle_gram_is_the_triangle_cholesky_reads(device, dtype, batch, upper):
    """From d = 512 (``solver._TRIANGLE_MIN``) a fresh Gram is formed one triangle at a time, in column
    blocks. That triangle equals the plain product's, and LAPACK's Cholesky (``cholesky_ex``) reads only
    that triangle: NaN in the other one changes no bit of the factor (the contract the saving relies on)."""
    torch.manual_seed(0)
    d = solver._TRIANGLE_MIN + solver._TRIANGLE_BLOCK // 2 + 1  # a partial last block
    x = torch.randn(*batch, d + 40, d, dtype=dtype, device=device)
    lam = 0.5
    k = solver._shifted_gram(x.mT, x, lam, upper=upper)
    plain = x.mT @ x + lam * torch.eye(d, dtype=dtype, device=device)
    keep = torch.ones(d, d, dtype=torch.bool, device=device)
    keep = keep.triu() if upper else keep.tril()
    tol = dict(rtol=1e-5, atol=1e-3) if dtype == torch.float32 else {}
    torch.testing.assert_close(k[..., keep], plain[..., keep], **tol)
    poisoned = plain.clone()
    poisoned[..., ~keep] = float("nan")
    expected, info = torch.linalg.cholesky_ex(plain, upper=upper)
    got, info2 = torch.linalg.cholesky_ex(poisoned, upper=upper)
    assert not info.any() and not info2.any()
    assert torch.equal(got, expected)
    torch.testing.assert_close(torch.linalg.cholesky_ex(k, upper=upper)[0], expected, **tol)


@pytest.mark.parametrize("out", [5, 400], ids=["cholesky-solve", "inverse"])
def test_wide_linear_layer_solves_eq6_with_the_triangle_gram(out):
    """A primal solve at d ≥ 512 (the triangle Gram), with the lower factor (cholesky_solve) and the upper one
    (K⁻¹ when the right-hand sides are many): realised weights equal the explicit ridge solve of eq. 6-7, and
    the target gradient equals autograd through that explicit formula."""
    torch.manual_seed(1)
    d_in, nbar = solver._TRIANGLE_MIN + 20, 600
    lam = 1e-2
    lin = nn.Linear(d_in, out).double()
    model = nn.Sequential(nn.Linear(8, d_in).double(), nn.Tanh(), lin)
    ref, x = torch.randn(nbar, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    tp.to_target_space(model, ref, lam=lam, init="random")
    assert solver.prefers_inverse(d_in + 1, out) == (out == 400)
    with torch.no_grad():
        a = torch.tanh(model[0](ref))
    a = torch.cat([a, torch.ones(nbar, 1, dtype=a.dtype)], 1)
    t = lin.parametrizations.weight.original
    wt = torch.linalg.solve(a.T @ a + lam * torch.eye(d_in + 1, dtype=a.dtype), a.T @ t)
    torch.testing.assert_close(lin.weight, wt[:-1].T, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(lin.bias, wt[-1], rtol=1e-8, atol=1e-10)
    h = torch.tanh(model[0](x)).detach()  # the gradient reaching the last target, through W alone
    model.zero_grad()
    loss = lambda w, b: (h @ w.T + b).square().sum()
    loss(lin.weight, lin.bias).backward()
    wt2 = torch.linalg.solve(a.T @ a + lam * torch.eye(d_in + 1, dtype=a.dtype), a.T @ t)
    (expected,) = torch.autograd.grad(loss(wt2[:-1].T, wt2[-1]), t)
    torch.testing.assert_close(t.grad, expected, rtol=1e-8, atol=1e-10)


# ------------------------------------------------------------------------------------------ host synchronisations
_SYNCS = ("_local_scalar_dense", "equal", "is_nonzero", "_linalg_check_errors")  # dispatched
_SYNC_CALLS = ("tolist", "item", "__bool__", "equal")  # called from Python (``.tolist()`` does not dispatch)


def _sync_count(step) -> dict:
    """What reads a value back to the host (``.item()``/``.tolist()``, ``torch.equal``, ``bool(tensor)``,
    LAPACK's info checks), each a synchronisation on a GPU: Python calls by a TorchFunctionMode, the ops
    dispatched inside by a TorchDispatchMode."""
    from collections import Counter

    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = Counter()

    class Calls(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if name in _SYNC_CALLS:
                seen[name] += 1
            return func(*args, **(kwargs or {}))

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in _SYNCS:
                seen["aten." + name] += 1
            return func(*args, **(kwargs or {}))
    with Calls(), Ops():
        step()
    return dict(seen)


@pytest.mark.parametrize("batch", ["minibatch", "copy of X̄", "X̄ itself"])
def test_a_training_step_on_the_gpu_path_synchronises_once(batch, monkeypatch):
    """With the CUDA branches taken (the device-type sets forced to CUDA's on the CPU), a training step,
    minibatch the size of X̄ included, reads one value back to the host: the realisation's check
    (``Realiser._check``). Neither the minibatch nor the first layer's cached input is compared by value;
    the tensor given as X̄ at conversion is known without reading it, and its forward is the reference pass."""
    from target_param import solver
    from target_param.layers import CHANNELS_LAST_DEVICES

    monkeypatch.setattr(solver, "_TRIANGLE_DEVICES", set())
    solver.SYNC_FREE_DEVICES.add("cpu")
    CHANNELS_LAST_DEVICES.discard("cpu")
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
        ref = torch.randn(8, 3, 6, 6)
        tp.to_target_space(model, ref, lam=0.1)
        opt = torch.optim.SGD(model.parameters(), 1e-2)

        def step(x):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
        for _ in range(2):  # warm: the first layer's factor is cached
            step(torch.randn(8, 3, 6, 6))
        x = {"minibatch": torch.randn(8, 3, 6, 6), "copy of X̄": ref.clone(), "X̄ itself": ref}[batch]
        merges = realisers(model)[0].merges
        assert _sync_count(lambda: step(x)) == {"tolist": 1}  # Realiser._check
        assert realisers(model)[0].merges == merges + (batch == "X̄ itself")
    finally:
        solver.SYNC_FREE_DEVICES.discard("cpu")
        CHANNELS_LAST_DEVICES.add("cpu")
