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


def test_training_loop_unchanged_and_loss_decreases():
    m, ref = converted_mlp()
    x, y = torch.randn(64, 2, dtype=torch.float64), torch.randint(0, 2, (64,))
    opt = torch.optim.Adam(m.parameters(), 1e-2)
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


def test_dropout_follows_model_mode_in_reference_pass():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 3))
    ref = torch.randn(32, 4)
    tp.to_target_space(m, ref, lam=1e-3)
    x = torch.randn(5, 4)
    m.eval()
    with torch.no_grad():
        w_eval = m[2].weight.clone()
        assert torch.equal(m[2].weight, w_eval)  # eval: deterministic and cached
    m.train()
    m(x)
    w1 = m[2].weight.detach().clone()
    m(x)
    w2 = m[2].weight.detach().clone()
    assert not torch.equal(w1, w2)  # train mode: the reference pass drops too (footnote 6)


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
