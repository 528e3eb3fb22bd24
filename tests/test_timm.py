"""Real-world coverage: timm models (pretrained=False, small inputs) converted with one call.

For each model:
1. ``init="project"`` in float64 with λ = 1e-12 sets every target to the layer's sums, T_j = S_j, and keeps
   the eval-mode output on the reference batch within 1e-4 (relative). The realised weights are the
   min-norm ones, W' = W·P with P the projection onto the span of the layer's reference inputs. On *fresh*
   inputs a layer whose reference inputs do not span its input space (a classifier or squeeze-excite conv
   after global pooling has n̄ columns for d_in + 1 rows; channels that are zero on the reference batch)
   loses the part of W outside that span, so fresh outputs change; docs/models.md lists the measured figures.
2. Three Adam steps on the targets lower the loss on a fixed batch.
3. A state_dict loads into a freshly converted copy and gives identical outputs.
4. ``to_weight_space`` restores the classes and the state_dict keys.
"""

import pytest
import torch
import torch.nn.functional as F

import target_param as tp

timm = pytest.importorskip("timm")

N_REF = 8
SIZE = 64
EXTRA = ["resnet18", "convnext_atto", "efficientnet_b0", "mobilenetv3_small_100", "regnetx_002",
         "vit_tiny_patch16_224"]
REFUSED = {"test_nfnet": "ScaledStdConv2d"}  # weight-standardising convs are refused by name
MODELS = sorted(set(timm.list_models("test_*")) - set(REFUSED)) + EXTRA


def create(name, dtype=torch.float32):
    torch.manual_seed(0)
    kw = {"img_size": SIZE} if any(k in name for k in ("vit", "coat", "maxvit")) else {}
    return timm.create_model(name, pretrained=False, num_classes=10, **kw).to(dtype)


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("name", MODELS)
def test_timm_model_converts(name):
    # 1. function preservation (float64, λ → 0: random-noise images give nearly collinear pooled features,
    #    whose tiny Gram eigenvalues make even λ = 1e-8 visible, e.g. 27% on efficientnet_b0)
    model = create(name, torch.float64).eval()
    ref = torch.randn(N_REF, 3, SIZE, SIZE, dtype=torch.float64)
    sums = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, n=n: sums.__setitem__(n, out.detach().clone()))
             for n, m in model.named_modules() if isinstance(m, tp.adapters.SUPPORTED)]
    with torch.no_grad():
        y0 = model(ref)
    for h in hooks:
        h.remove()
    plan = tp.explain(model, ref, lam=1e-12)
    assert plan.traced, plan.fallback_reason
    with pytest.warns(tp.RankDeficientWarning):
        tp.to_target_space(model, ref, lam=1e-12)
    with torch.no_grad():
        assert rel(model(ref), y0) < 1e-4
        for pl in plan.layers:
            mod = dict(model.named_modules())[pl.name]
            assert torch.equal(mod.parametrizations.weight.original, sums[pl.name])  # T = S (eq. 13)

    # 2. three Adam steps lower the loss on a fixed batch (float32, the paper's CNN λ)
    model = create(name).train()
    ref = torch.randn(N_REF, 3, SIZE, SIZE)
    with pytest.warns(tp.RankDeficientWarning):
        tp.to_target_space(model, ref, lam=0.1)
    x, y = ref, torch.arange(N_REF) % 10
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    model.eval()  # a deterministic loss on the fixed batch (drop-path, dropout off)
    with torch.no_grad():
        first = F.cross_entropy(model(x), y).item()
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        last = F.cross_entropy(model(x), y).item()
    assert last < first

    # 3. state_dict into a freshly converted copy
    fresh = create(name)
    with pytest.warns(tp.RankDeficientWarning):
        tp.to_target_space(fresh, torch.randn(N_REF, 3, SIZE, SIZE), lam=0.1)
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    probe = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(fresh(probe), model(probe))

    # 4. back to weight space
    plain = create(name)
    keys, classes = list(plain.state_dict()), [type(m) for m in plain.modules()]
    tp.to_weight_space(model)
    assert list(model.state_dict()) == keys
    assert [type(m) for m in model.modules()] == classes
    with torch.no_grad():
        assert torch.allclose(model(probe), fresh(probe), rtol=1e-4, atol=1e-5)


def test_weight_standardising_conv_is_refused_by_name():
    model = create("test_nfnet")
    with pytest.raises(tp.UnsupportedLayerError, match="ScaledStdConv2d") as info:
        tp.to_target_space(model, torch.randn(2, 3, SIZE, SIZE))
    assert "filter_fn" in str(info.value)
