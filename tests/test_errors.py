"""Bad input gets a named error, and conversion leaves the model exactly as it was."""
import pytest
import torch
from torch import nn

import target_param as tp
from conftest import SmallCNN, ShortcutMLP, assert_same_state, model_state


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.shared = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.shared(torch.relu(self.shared(self.a(x)))))


class RaisesOnThirdCall(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 3), nn.Linear(3, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls >= 3:
            raise RuntimeError("boom")
        return self.l2(self.l1(x))


def expect_untouched(model, ref, error, match=None, **kw):
    was_converted = tp.is_target_space(model)
    before = model_state(model)
    with pytest.raises(error, match=match) as info:
        tp.to_target_space(model, ref, **kw)
    assert_same_state(before, model_state(model))
    assert tp.is_target_space(model) == was_converted
    return str(info.value)


def cnn():
    torch.manual_seed(0)
    return SmallCNN()


REF = torch.randn(8, 3, 8, 8)


def test_reference_batch_the_model_rejects():
    msg = expect_untouched(cnn(), torch.randn(8, 5, 8, 8), tp.ReferenceBatchError, "forward raised")
    assert "error: RuntimeError" in msg


def test_reference_batch_wrong_dtype():
    msg = expect_untouched(cnn(), REF.double(), tp.ReferenceBatchError, "dtype")
    assert "model dtype: torch.float32" in msg


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
@pytest.mark.cuda
def test_reference_batch_wrong_device():
    expect_untouched(cnn(), REF.cuda(), tp.ReferenceBatchError, "device")


def test_reference_batch_wrong_device_meta():
    expect_untouched(cnn(), REF.to("meta"), tp.ReferenceBatchError, "device")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_reference_batch_non_finite(bad):
    ref = REF.clone()
    ref[3, 1, 2, 2] = bad
    msg = expect_untouched(cnn(), ref, tp.ReferenceBatchError, "NaN or Inf")
    assert "non-finite entries: 1" in msg


def test_reference_batch_empty():
    expect_untouched(cnn(), REF[:0], tp.ReferenceBatchError, "empty")


def test_reference_batch_not_a_tensor():
    expect_untouched(cnn(), [1, 2], tp.ReferenceBatchError, "tensor")


@pytest.mark.parametrize("lam", [-1e-3, float("nan"), "0.1"])
def test_bad_lam(lam):
    msg = expect_untouched(cnn(), REF, tp.InvalidArgumentError, "lam", lam=lam)
    assert f"lam: {lam}" in msg


def test_unknown_init_and_cascade():
    expect_untouched(cnn(), REF, tp.InvalidArgumentError, "init", init="xavier")
    expect_untouched(cnn(), REF, tp.InvalidArgumentError, "cascade", cascade="scu")
    expect_untouched(cnn(), REF, tp.InvalidArgumentError, "target_std", target_std=0)


def test_no_eligible_layer():
    expect_untouched(nn.Sequential(nn.ReLU(), nn.LayerNorm(3)), torch.randn(4, 3), tp.NoEligibleLayerError)
    expect_untouched(cnn(), REF, tp.NoEligibleLayerError, "filter_fn", filter_fn=lambda m, n: False)


def test_already_converted():
    m = cnn()
    tp.to_target_space(m, REF, lam=0.1)
    expect_untouched(m, REF, tp.AlreadyConvertedError, "to_weight_space")
    outer = nn.Sequential(m)
    expect_untouched(outer, REF, tp.AlreadyConvertedError)


def test_layer_called_twice_names_layer_and_count():
    torch.manual_seed(0)
    msg = expect_untouched(Twice(), torch.randn(10, 4), tp.LayerReusedError, "'shared' runs 2 times")
    assert "calls: 2" in msg and "filter_fn" in msg
    m = Twice()
    tp.to_target_space(m, torch.randn(10, 4), filter_fn=lambda mod, name: name != "shared")
    assert not hasattr(m.shared, "parametrizations") and hasattr(m.a, "parametrizations")


def test_exception_inside_forward_during_conversion_is_transactional():
    m = RaisesOnThirdCall()
    m(torch.randn(2, 3))
    m(torch.randn(2, 3))  # the reference pass is call 3 and raises
    before = model_state(m)
    with pytest.raises(tp.ReferenceBatchError, match="boom"):
        tp.to_target_space(m, torch.randn(5, 3))
    assert_same_state(before, model_state(m))


def test_failure_after_registration_rolls_back_attention_and_bare_parameter_owners(monkeypatch):
    """The owners of functional units (nn.MultiheadAttention's projections, a module's bare Parameter used by
    F.linear) are restored too."""
    from target_param import realise

    class Owners(nn.Module):
        def __init__(self):
            super().__init__()
            self.att = nn.MultiheadAttention(4, 2, batch_first=True)
            self.w = nn.Parameter(torch.randn(3, 4))

        def forward(self, x):
            return torch.nn.functional.linear(self.att(x, x, x, need_weights=False)[0], self.w)
    m = Owners()
    before = model_state(m)

    def fail(self, **kw):
        raise tp.SolveError("injected", None)

    monkeypatch.setattr(realise.Realiser, "realise", fail)
    with pytest.raises(tp.SolveError, match="injected"):
        tp.to_target_space(m, torch.randn(6, 5, 4))
    assert_same_state(before, model_state(m))
    assert not hasattr(m.att, "parametrizations") and not hasattr(m, "parametrizations")


def test_failure_after_registration_rolls_back(monkeypatch):
    """Errors in the registration phase (here a failing final realisation) undo every change."""
    from target_param import realise

    m = cnn()
    before = model_state(m)

    def fail(self, **kw):
        raise tp.SolveError("injected", None)

    monkeypatch.setattr(realise.Realiser, "realise", fail)
    with pytest.raises(tp.SolveError, match="injected"):
        tp.to_target_space(m, REF, lam=0.1, init="random")
    assert_same_state(before, model_state(m))
    monkeypatch.undo()
    tp.to_target_space(m, REF, lam=0.1)  # and the model still converts afterwards
    assert tp.is_target_space(m)


def test_unsupported_subclass_is_refused():
    class ScaledConv(nn.Conv2d):
        def forward(self, x):
            return self._conv_forward(x, self.weight * 2, self.bias)

    m = nn.Sequential(ScaledConv(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    msg = expect_untouched(m, REF, tp.UnsupportedLayerError, "'0' cannot be converted")
    assert "filter_fn" in msg
    tp.to_target_space(m, REF, filter_fn=lambda mod, name: name != "0")


def test_rank_deficiency_warns_with_layer_name():
    torch.manual_seed(0)
    m = ShortcutMLP(sizes=(2, 30, 2))
    with pytest.warns(tp.RankDeficientWarning, match="layers.1.*n̄ × positions = 8 < d_in \\+ 1 = 33"):
        tp.to_target_space(m, torch.randn(8, 2))


def test_nan_during_realisation_names_layer_and_keeps_targets():
    torch.manual_seed(0)
    m = ShortcutMLP()
    tp.to_target_space(m, torch.randn(20, 2))
    t = m.layers[1].parametrizations.weight.original
    with torch.no_grad():
        t[0, 0] = float("nan")
    targets = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(tp.SolveError, match="layers.1"):
        m(torch.randn(3, 2))
    for a, b in zip(targets, m.parameters()):
        assert torch.equal(a, b, ) or (torch.isnan(a) == torch.isnan(b)).all()


def test_functional_weight_use_is_named():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return torch.nn.functional.linear(x, self.fc.weight) + self.fc(x)

    msg = expect_untouched(Functional(), torch.randn(6, 3), tp.FunctionalWeightUseError, "'fc'")
    assert "filter_fn" in msg


def test_every_tied_layer_is_named_in_one_refusal():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(),
                        nn.Linear(4, 4))
    net[2].weight, net[6].weight = net[0].weight, net[4].weight
    before = model_state(net)
    with pytest.raises(tp.LayerReusedError) as info:
        tp.to_target_space(net, torch.randn(10, 4))
    assert info.value.values["layers"] == ["0", "2", "4", "6"]
    assert "name not in {'0', '2', '4', '6'}" in str(info.value)
    assert_same_state(before, model_state(net))


def test_a_checkpoint_of_another_reference_batch_size_is_refused_by_name():
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    model = tp.to_target_space(net(), torch.randn(8, 3))
    other = tp.to_target_space(net(), torch.randn(10, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(tp.ReferenceBatchError, match=r"target_space_reference[\s\S]*checkpoint: \(10, 3\)"):
        model.load_state_dict(other.state_dict())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    fresh = tp.to_target_space(net(), other.state_dict()["target_space_reference"])  # the way out
    fresh.load_state_dict(other.state_dict())
    copy_ = __import__("copy").deepcopy(model)
    tp.to_weight_space(copy_)
    assert not copy_._load_state_dict_pre_hooks and not tp.is_target_space(copy_)
