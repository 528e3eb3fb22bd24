"""The core contract: parameters, realisation timing, round trips, BatchNorm/Dropout, devices."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import target_param as tp
from conftest import DEVICES, ShortcutMLP, SmallCNN


def converted_mlp(lam=1e-3, **kw):
    torch.manual_seed(0)
    m = ShortcutMLP().double()
    ref = torch.randn(40, 2, dtype=torch.float64)
    return tp.to_target_space(m, ref, lam=lam, **kw), ref


def test_returns_model_and_targets_are_the_only_parameters():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2, bias=False), nn.LayerNorm(2))
    keep = {id(p) for p in m[3].parameters()}
    ref = torch.randn(7, 3)
    assert tp.to_target_space(m, ref) is m
    params = dict(m.named_parameters())
    assert sorted(params) == ["0.parametrizations.weight.original", "2.parametrizations.weight.original",
                              "3.bias", "3.weight"]
    assert params["0.parametrizations.weight.original"].shape == (7, 4)
    assert params["2.parametrizations.weight.original"].shape == (7, 2)
    assert {id(p) for p in m[3].parameters()} == keep  # unconverted layers keep their parameters
    assert m[0].bias.shape == (4,) and m[0].weight.shape == (4, 3)
    assert m[2].bias is None
    assert tp.is_target_space(m)


def test_target_shapes_for_sequences_and_convs():
    lin = nn.Linear(5, 3)
    tp.to_target_space(lin, torch.randn(4, 6, 5))
    assert lin.parametrizations.weight.original.shape == (4, 6, 3)
    conv = nn.Conv2d(2, 3, 3, stride=2)
    tp.to_target_space(conv, torch.randn(4, 2, 9, 9))
    assert conv.parametrizations.weight.original.shape == (4, 3, 4, 4)


@pytest.mark.parametrize("cascade", ["sequential", "optimistic"])
def test_project_init_preserves_function(cascade):
    torch.manual_seed(0)
    m = ShortcutMLP().double()
    ref = torch.randn(60, 2, dtype=torch.float64)
    x = torch.randn(30, 2, dtype=torch.float64)
    before = m(x)
    tp.to_target_space(m, ref, lam=1e-9, cascade=cascade)
    assert torch.allclose(m(x), before, atol=1e-6)


def ridge(a, t, lam, bias=True):
    """Eq. 6 written out, independently of the library: ``W[0:j] = T A^‡``, ``A^‡ = Aᵀ(AAᵀ + λI)⁻¹``, with A
    the input ``a`` (N × d, rows = patterns) and a ones row for the bias. Returns nn.Linear's (weight, bias)."""
    if bias:
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
    A, T = a.T, t.T  # the paper's column layout
    W = torch.linalg.solve(A @ A.T + lam * torch.eye(A.shape[0], dtype=a.dtype), A @ T.T).T
    return (W[:, :-1], W[:, -1]) if bias else (W, None)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def explicit_shortcut_mlp(targets, ref, x, lam):
    """conftest.ShortcutMLP (tanh, all shortcuts) in target space, written out in float64: Algorithm 2 (SCU)
    on ``ref`` in forward order, each layer's weights by ``ridge``, then Algorithm 1 on ``x``."""
    feats_ref, feats_x = [ref], [x]
    for j, t in enumerate(targets):
        w, b = ridge(torch.cat(feats_ref, 1), t, lam)
        s_ref, s_x = torch.cat(feats_ref, 1) @ w.T + b, torch.cat(feats_x, 1) @ w.T + b
        if j < len(targets) - 1:
            feats_ref.append(torch.tanh(s_ref))
            feats_x.append(torch.tanh(s_x))
    return s_x


def test_training_loop_unchanged_and_loss_decreases():
    """The ordinary training loop trains the targets: one SGD step and two Adam steps equal the same steps
    taken by hand with dL/dT from autograd through the explicit float64 eq. 6 / Algorithm 2 map
    (``explicit_shortcut_mlp``), and the loss then decreases."""
    m, ref = converted_mlp()
    x, y = torch.randn(64, 2, dtype=torch.float64), torch.randint(0, 2, (64,))
    targets = [lin.parametrizations.weight.original for lin in m.layers]
    taus = [t.detach().clone() for t in targets]

    def reference_grads(taus):
        leaves = [t.clone().requires_grad_(True) for t in taus]
        loss = F.cross_entropy(explicit_shortcut_mlp(leaves, ref, x, 1e-3), y)
        return loss.item(), torch.autograd.grad(loss, leaves)

    # SGD (scale-sensitive: a gradient off by a factor fails here, though Adam's first step would hide it)
    lr = 0.5
    opt = torch.optim.SGD(m.parameters(), lr)
    opt.zero_grad()
    loss = F.cross_entropy(m(x), y)
    loss.backward()
    opt.step()
    ref_loss, grads = reference_grads(taus)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-12)
    for t, tau, g in zip(targets, taus, grads):
        assert g.norm() > 1e-6
        assert rel_err(t.grad, g) < 1e-7
        assert rel_err(t.detach() - tau, -lr * g) < 1e-7
    taus = [t.detach().clone() for t in targets]

    # Adam, by hand (Kingma and Ba, with PyTorch's defaults)
    lr, (b1, b2), eps = 1e-2, (0.9, 0.999), 1e-8
    opt = torch.optim.Adam(m.parameters(), lr)
    start = [t.clone() for t in taus]
    mom = [torch.zeros_like(t) for t in taus]
    var = [torch.zeros_like(t) for t in taus]
    for step in (1, 2):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
        _, grads = reference_grads(taus)
        for i, g in enumerate(grads):
            mom[i] = b1 * mom[i] + (1 - b1) * g
            var[i] = b2 * var[i] + (1 - b2) * g * g
            taus[i] = taus[i] - lr * (mom[i] / (1 - b1**step)) / ((var[i] / (1 - b2**step)).sqrt() + eps)
        for t, tau, before in zip(targets, taus, start):
            assert rel_err(t.detach() - before, tau - before) < 1e-7

    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_realisation_counts():
    m, ref = converted_mlp()
    x = torch.randn(8, 2, dtype=torch.float64)
    n0 = tp.realisations(m)
    m(x)  # grad-enabled forward realises once
    assert tp.realisations(m) == n0 + 1
    with torch.no_grad():
        m(x)  # the grad-enabled cache is still fresh
        for _ in range(5):
            m(x)
    assert tp.realisations(m) == n0 + 1
    m.eval()
    with torch.no_grad():
        m(x)  # a mode change invalidates
        for _ in range(5):
            m(x)
        _ = m.layers[0].weight
    assert tp.realisations(m) == n0 + 2
    with torch.no_grad():
        m.layers[1].parametrizations.weight.original.add_(0.1)  # an in-place edit is seen
        m(x)
        m(x)
    assert tp.realisations(m) == n0 + 3
    m.train()
    for _ in range(3):
        m(x).sum().backward()
    assert tp.realisations(m) == n0 + 6


def test_no_stale_weights_after_step():
    m, ref = converted_mlp()
    opt = torch.optim.SGD(m.parameters(), 0.5)
    x = torch.randn(8, 2, dtype=torch.float64)
    m(x).square().sum().backward()
    w_before = m.layers[2].weight.detach().clone()
    opt.step()
    w_after = m.layers[2].weight.detach().clone()
    assert not torch.allclose(w_before, w_after)
    fresh = copy.deepcopy(m)  # a copy realises from scratch
    assert torch.equal(fresh.layers[2].weight, w_after)


def test_gradient_accumulation_matches_one_big_batch():
    m, ref = converted_mlp()
    m2 = copy.deepcopy(m)
    x, y = torch.randn(32, 2, dtype=torch.float64), torch.randint(0, 2, (32,))
    for xs, ys in zip(x.chunk(2), y.chunk(2)):
        (F.cross_entropy(m(xs), ys, reduction="sum")).backward()
    F.cross_entropy(m2(x), y, reduction="sum").backward()
    for p, q in zip(m.parameters(), m2.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-9, atol=1e-12)


def test_state_dict_round_trip_and_reference_buffer():
    m, ref = converted_mlp()
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    x = torch.randn(8, 2, dtype=torch.float64)
    m(x).square().sum().backward()
    opt.step()
    sd = m.state_dict()
    assert torch.equal(sd["target_space_reference"], ref)
    torch.manual_seed(1)
    other = tp.to_target_space(ShortcutMLP().double(), torch.randn(40, 2, dtype=torch.float64), init="random")
    other.load_state_dict(sd)
    assert torch.equal(other(x), m(x))


def test_to_weight_space_restores_plain_model():
    torch.manual_seed(0)
    m = SmallCNN()
    classes = [type(x) for x in m.modules()]
    keys = list(m.state_dict().keys())
    ref = torch.randn(8, 3, 8, 8)
    tp.to_target_space(m, ref, lam=0.1)
    m.eval()
    with torch.no_grad():
        y = m(ref)
        w = m.conv2.weight.clone()
    assert tp.to_weight_space(m) is m
    assert [type(x) for x in m.modules()] == classes
    assert list(m.state_dict().keys()) == keys
    assert not tp.is_target_space(m)
    for mod in m.modules():
        assert not mod._forward_pre_hooks and not mod._forward_hooks and not mod._forward_hooks_always_called
        assert not mod._forward_pre_hooks_with_kwargs and not mod._forward_hooks_with_kwargs
    assert all(isinstance(p, nn.Parameter) for p in (m.conv1.bias, m.fc.bias, m.conv2.weight))
    assert torch.equal(m.conv2.weight, w)
    with torch.no_grad():
        assert torch.allclose(m(ref), y, atol=1e-6)
    with pytest.raises(tp.NotConvertedError):
        tp.to_weight_space(m)


def test_batchnorm_stats_untouched_and_mode_restored():
    torch.manual_seed(0)
    m = SmallCNN()
    m.train()
    stats = [b.clone() for b in m.bn.buffers()]
    ref = torch.randn(8, 3, 8, 8)
    tp.to_target_space(m, ref, lam=0.1)
    assert m.training and m.bn.training and m.bn.track_running_stats
    for a, b in zip(stats, m.bn.buffers()):
        assert torch.equal(a, b)
    m.eval()
    with torch.no_grad():
        m(ref)
    m.train()
    m(ref)  # the training forward itself updates running stats as usual; the reference pass does not
    assert m.bn.num_batches_tracked.item() == 1


def test_a_mode_switch_alone_realises_again():
    """Realised under no_grad in train mode (dropout active in the reference pass), then switched to eval with
    nothing else changed (no parameter, no buffer): the next gradient-free forward realises again, without
    dropout, and equals a plain copy made in eval mode."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3))
    ref, x = torch.randn(20, 4), torch.randn(3, 4)
    tp.to_target_space(m, ref, lam=0.1)
    with torch.no_grad():
        m(x)
        n = tp.realisations(m)
        m.eval()
        y = m(x)
    assert tp.realisations(m) == n + 1
    plain = tp.to_weight_space(copy.deepcopy(m))
    with torch.no_grad():
        torch.testing.assert_close(y, plain(x))


def test_the_pass_stream_follows_the_seed_and_leaves_the_global_stream_alone():
    """With dropout active, the reference pass is seeded by a hash of the global generator's state, which it
    does not advance: the same seed realises the same weights, another seed others; and the global stream is
    where it would be without the pass (a forward's own dropout is the plain model's)."""
    def realised(seed):
        torch.manual_seed(0)  # one model, one X̄, one set of targets
        m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3))
        tp.to_target_space(m, torch.randn(20, 4), lam=0.1, init="random")
        torch.manual_seed(seed)  # the global state when the next pass runs
        with torch.no_grad():
            m[0].parametrizations.weight.original.add_(0.0)  # stale: the next forward realises
            m(torch.randn(2, 4))  # (train mode: the pass's dropout draws from its own seed)
            return m, m[3].weight.clone()
    (m, a), (_, b), (_, c) = realised(1), realised(1), realised(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    plain = tp.to_weight_space(copy.deepcopy(m))
    x = torch.randn(5, 4)
    torch.manual_seed(3)
    y = m(x)  # realises (train mode, a training forward), then the forward's own dropout
    with torch.no_grad():
        plain[0].weight.copy_(m[0].weight), plain[0].bias.copy_(m[0].bias)
        plain[3].weight.copy_(m[3].weight), plain[3].bias.copy_(m[3].bias)
    torch.manual_seed(3)
    torch.testing.assert_close(y, plain(x))


def test_dropout_follows_model_mode_in_reference_pass():
    """Eval: the reference pass skips dropout, so realisation after realisation gives the same weights, those
    of eq. 6 solved (``ridge``) on the dropout-free input. Train: it drops (footnote 6), so they differ."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 3)).double()
    ref = torch.randn(32, 4, dtype=torch.float64)
    tp.to_target_space(m, ref, lam=1e-3)
    x = torch.randn(5, 4, dtype=torch.float64)
    t0, t2 = (m[i].parametrizations.weight.original for i in (0, 2))
    m.eval()
    with torch.no_grad():
        w0, b0 = ridge(ref, t0, 1e-3)
        w2, b2 = ridge(ref @ w0.T + b0, t2, 1e-3)  # layer 2's input without dropout: S_0 (SCU)
        seen = []
        for _ in range(3):
            n = tp.realisations(m)
            t0.add_(0.0)  # an in-place edit (same values): the next forward realises again
            m(x)
            assert tp.realisations(m) == n + 1
            seen.append(m[2].weight.clone())
            torch.testing.assert_close(m[2].weight, w2, rtol=1e-8, atol=1e-10)
            torch.testing.assert_close(m[2].bias, b2, rtol=1e-8, atol=1e-10)
        assert all(torch.equal(w, seen[0]) for w in seen)
    m.train()
    m(x)
    w1 = m[2].weight.detach().clone()
    m(x)
    w2 = m[2].weight.detach().clone()
    assert not torch.equal(w1, w2)  # train mode: the reference pass drops too (footnote 6)


@pytest.mark.parametrize("edit", ["reference", "running_mean", "running_var"])
def test_in_place_buffer_edit_realises_again_in_eval_mode(edit):
    """Eval mode, no_grad: an in-place edit of a buffer the reference pass reads (the reference batch, a
    BatchNorm's running statistics) makes the next forward realise again, with the weights of eq. 6
    (``ridge``) on the new input, BatchNorm's eval formula written out."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2)).double()
    with torch.no_grad():
        m[1].running_mean.normal_()
        m[1].running_var.uniform_(0.5, 2.0)
    ref = torch.randn(20, 3, dtype=torch.float64)
    tp.to_target_space(m, ref, lam=1e-3)
    m.eval()
    x = torch.randn(5, 3, dtype=torch.float64)
    with torch.no_grad():
        m(x)
        n = tp.realisations(m)
        m(x)
        assert tp.realisations(m) == n  # nothing changed: no realisation
        buf = {"reference": m.target_space_reference, "running_mean": m[1].running_mean,
               "running_var": m[1].running_var}[edit]
        buf.mul_(2)
        out = m(x)
        assert tp.realisations(m) == n + 1
        bn = m[1]
        t0, t3 = (m[i].parametrizations.weight.original for i in (0, 3))
        w0, b0 = ridge(m.target_space_reference, t0, 1e-3)
        s0 = m.target_space_reference @ w0.T + b0
        a3 = torch.tanh((s0 - bn.running_mean) / (bn.running_var + bn.eps).sqrt() * bn.weight + bn.bias)
        w3, b3 = ridge(a3, t3, 1e-3)
        for got, want in ((m[0].weight, w0), (m[0].bias, b0), (m[3].weight, w3), (m[3].bias, b3)):
            torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
        h = torch.tanh((x @ w0.T + b0 - bn.running_mean) / (bn.running_var + bn.eps).sqrt() * bn.weight + bn.bias)
        torch.testing.assert_close(out, h @ w3.T + b3, rtol=1e-8, atol=1e-10)


def test_optimistic_with_in_place_relu_leaves_targets_unchanged():
    """OCU (eq. 8) passes a copy of T_j on: a ReLU(inplace=True) after the layer changes that copy, never the
    target (bit-for-bit, in a no_grad and in a grad-enabled realisation), and the next layer is solved from
    g(T_j) = relu(T_j) (``ridge``)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 8), nn.ReLU(inplace=True), nn.Linear(8, 2)).double()
    ref = torch.randn(20, 3, dtype=torch.float64)
    tp.to_target_space(m, ref, lam=1e-3, cascade="optimistic", init="random")
    t0, t2 = (m[i].parametrizations.weight.original for i in (0, 2))
    x = torch.randn(5, 3, dtype=torch.float64)
    with torch.no_grad():
        t0.copy_(torch.randn(t0.shape, dtype=t0.dtype))  # an in-place edit: the next forward realises
        assert (t0 < 0).any()  # else the ReLU would change nothing
        before = [t0.clone(), t2.clone()]
        n = tp.realisations(m)
        m(x)
        assert tp.realisations(m) == n + 1
        assert torch.equal(t0, before[0]) and torch.equal(t2, before[1])
        w0, b0 = ridge(ref, t0, 1e-3)
        w2, b2 = ridge(torch.relu(t0), t2, 1e-3)
        for got, want in ((m[0].weight, w0), (m[0].bias, b0), (m[2].weight, w2), (m[2].bias, b2)):
            torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    m(x).sum().backward()  # a grad-enabled realisation
    assert torch.equal(t0, before[0]) and torch.equal(t2, before[1])
    assert t0.grad is not None and t0.grad.abs().sum() > 0


def test_optimistic_passes_targets_on():
    m, ref = converted_mlp(cascade="optimistic", init="random")
    seen = {}
    m.layers[1].register_forward_pre_hook(lambda mod, a: seen.setdefault("a", a[0].detach().clone()))
    with torch.no_grad():
        m.layers[0].parametrizations.weight.original.add_(1.0)  # force a reference pass
        m(ref)
    t0 = m.layers[0].parametrizations.weight.original
    expected = torch.cat([ref, torch.tanh(t0)], 1)
    assert torch.allclose(seen["a"], expected)


def test_weight_assignment_is_refused():
    m, _ = converted_mlp()
    with pytest.raises(tp.AssignmentError, match="layers.0"):
        m.layers[0].weight = torch.zeros(5, 2, dtype=torch.float64)
    with pytest.raises(tp.AssignmentError, match="layers.0"):  # a Parameter too (nn.Module registers it itself)
        m.layers[0].bias = nn.Parameter(torch.zeros(5, dtype=torch.float64))
    m.layers[0].note = nn.Parameter(torch.zeros(1))  # other names are not ours


def test_deepcopy_is_independent():
    m, ref = converted_mlp()
    c = copy.deepcopy(m)
    with torch.no_grad():
        c.layers[0].parametrizations.weight.original.mul_(2)
    assert not torch.allclose(c.layers[0].weight, m.layers[0].weight)
    tp.to_weight_space(c)
    assert tp.is_target_space(m) and m.layers[0].weight.shape == (5, 2)


def test_submodule_conversion_leaves_rest_in_weight_space():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2)))
    tp.to_target_space(m[2], torch.randn(20, 6))
    names = [n for n, _ in m.named_parameters()]
    assert "0.weight" in names and "2.target_space_reference" in m.state_dict()
    loss = m(torch.randn(4, 3)).sum()
    loss.backward()
    assert m[0].weight.grad is not None and m[2][0].parametrizations.weight.original.grad is not None


def test_float16_model_solves_in_float32():
    lin = nn.Linear(4, 3).half()
    tp.to_target_space(lin, torch.randn(16, 4).half(), lam=1e-3)
    assert lin.weight.dtype == torch.float16 and torch.isfinite(lin.weight.float()).all()


def test_float64_model_solves_in_float64():
    from target_param.solver import solve_dtype
    assert solve_dtype(torch.float64) == torch.float64
    assert solve_dtype(torch.float16) == torch.float32
    assert solve_dtype(torch.bfloat16) == torch.float32


@pytest.mark.parametrize("device", DEVICES)
def test_devices(device):
    torch.manual_seed(0)
    m = SmallCNN().to(device)
    ref = torch.randn(8, 3, 8, 8, device=device)
    tp.to_target_space(m, ref, lam=0.1)
    out = m(ref)
    out.sum().backward()
    assert out.device.type == device
    assert m.conv1.parametrizations.weight.original.grad.device.type == device
    m.to("cpu")
    assert m.target_space_reference.device.type == "cpu"
    with torch.no_grad():
        m(ref.cpu())


def test_ill_conditioned_solve_falls_back_and_warns():
    """Duplicated channels make AAᵀ singular; with λ = 0 Cholesky fails and the retry warns."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    x = torch.randn(20, 2)
    ref = torch.cat([x, x], 1)
    with pytest.warns(tp.IllConditionedWarning, match="'Linear'"):
        tp.to_target_space(lin, ref, lam=0.0)
    assert torch.isfinite(lin.weight).all()


def test_weight_space_state_dict_is_the_plain_models_without_changing_the_converted_one():
    """Conv, attention (bare in_proj Parameters), nn.RNN and Linear: the same keys and values as
    ``to_weight_space`` of a copy, loadable into the original class; the model keeps its targets."""

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(2, 3, 3)
            self.att = nn.MultiheadAttention(3, 1, batch_first=True)
            self.r = nn.RNN(3, 4, batch_first=True)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            h = torch.tanh(self.c(x)).flatten(2).transpose(1, 2)
            h = self.att(h, h, h, need_weights=False)[0]
            return self.fc(self.r(h)[0][:, -1])
    torch.manual_seed(0)
    m = Mixed()
    fresh = copy.deepcopy(m)
    keys = set(m.state_dict())
    tp.to_target_space(m, torch.randn(10, 2, 5, 5))
    targets = {n: p.detach().clone() for n, p in m.named_parameters()}
    sd = tp.weight_space_state_dict(m)
    want = tp.to_weight_space(copy.deepcopy(m)).state_dict()
    assert set(sd) == set(want) == keys
    for k in want:
        assert torch.equal(sd[k], want[k]), k
    assert all(torch.equal(p, targets[n]) for n, p in m.named_parameters()) and tp.is_target_space(m)
    fresh.load_state_dict(sd)
    x = torch.randn(3, 2, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), m(x))
    with pytest.raises(tp.NotConvertedError):
        tp.weight_space_state_dict(fresh)


def test_an_optimiser_built_before_conversion_trains_the_targets():
    """The targets live in the Parameter objects the model held, so ``opt = Adam(net.parameters())`` then
    ``to_target_space(net, ref)`` trains exactly as the other order does (Linear layers and an attention's
    bare in_proj Parameter); after ``to_weight_space`` the same objects hold the realised weights."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 6)
            self.att = nn.MultiheadAttention(6, 2, batch_first=True)
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            h = torch.tanh(self.fc(x))
            return self.head(self.att(h, h, h, need_weights=False)[0])
    torch.manual_seed(0)
    before, after = Net(), None
    after = copy.deepcopy(before)
    ref = torch.randn(6, 5, 4)
    opt_before = torch.optim.Adam(before.parameters(), 1e-2)
    for m in (before, after):
        tp.to_target_space(m, ref)
    opt_after = torch.optim.Adam(after.parameters(), 1e-2)
    start = {k: v.clone() for k, v in before.state_dict().items()}
    for _ in range(3):
        x = torch.randn(3, 5, 4)
        for m, opt in ((before, opt_before), (after, opt_after)):
            opt.zero_grad()
            m(x).pow(2).sum().backward()
            opt.step()
    for (k, a), b in zip(before.state_dict().items(), after.state_dict().values()):
        assert torch.equal(a, b), k
    assert not torch.equal(before.state_dict()["fc.parametrizations.weight.original"],
                           start["fc.parametrizations.weight.original"])
    held = {id(p) for g in opt_before.param_groups for p in g["params"]}
    tp.to_weight_space(before)
    assert id(before.fc.weight) in held and id(before.att.in_proj_weight) in held
