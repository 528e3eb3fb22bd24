"""``torch.autograd.gradcheck`` (float64) through the realisation: model output on a fixed minibatch X as a
function of the targets, with the targets swapped in by ``torch.func.functional_call``.

Each call therefore runs Algorithm 2 (the reference pass on X̄, with the solve of eq. 6) and then Algorithm 1 on
X, so gradcheck compares autograd's dOutput/dT (what the library trains with) against central differences.
Both cascades (SCU, OCU) are checked, for Linear, Conv1d/2d/3d with stride/dilation/groups/padding modes,
ConvTranspose1d/2d/3d with stride/padding/output_padding/dilation/groups, and nn.MultiheadAttention (its bare
in_proj_weight and its out_proj solved at their F.linear calls, see target_param.functional).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call

import target_param as tp

DT = torch.float64


CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
)


def build(kind):
    """(model, per-pattern input shape, names of converted layers). Tiny sizes: gradcheck is O(#targets)."""
    if kind == "linear":
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), (3,), ["0", "2"]
    if kind == "linear-3d":
        return nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2, bias=False)), (2, 3), ["0", "2"]
    if kind == "conv1d":
        return (nn.Sequential(nn.Conv1d(2, 4, 3, stride=2, dilation=1, padding=1, padding_mode="reflect"), nn.Tanh(),
                              nn.Conv1d(4, 2, 2, groups=2, dilation=2)), (2, 7), ["0", "2"])
    if kind == "conv2d":
        return (nn.Sequential(nn.Conv2d(2, 4, 3, stride=(2, 1), padding="valid", dilation=(1, 2)), nn.Tanh(),
                              nn.Conv2d(4, 2, 2, groups=2, padding=1, padding_mode="circular")), (2, 5, 5), ["0", "2"])
    if kind == "conv2d-depthwise":
        return (nn.Sequential(nn.Conv2d(3, 3, 2, groups=3, padding="same"), nn.Tanh(),
                              nn.Conv2d(3, 2, 1, bias=False)), (3, 3, 3), ["0", "2"])
    if kind == "conv3d":
        return (nn.Sequential(nn.Conv3d(2, 2, 2, stride=(1, 2, 1), dilation=(2, 1, 1), padding=(1, 0, 0),
                                        padding_mode="replicate"), nn.Tanh(),
                              nn.Conv3d(2, 2, (2, 1, 2), groups=2)), (2, 3, 3, 3), ["0", "2"])
    if kind == "convtranspose1d":
        return (nn.Sequential(nn.ConvTranspose1d(2, 4, 3, stride=2, padding=1, output_padding=1), nn.Tanh(),
                              nn.ConvTranspose1d(4, 2, 2, groups=2, dilation=2)), (2, 3), ["0", "2"])
    if kind == "convtranspose2d":
        return (nn.Sequential(nn.ConvTranspose2d(2, 2, 2, stride=(2, 1), padding=(0, 1), dilation=(1, 2)), nn.Tanh(),
                              nn.ConvTranspose2d(2, 2, 2, stride=2, groups=2, output_padding=1, bias=False)),
                (2, 2, 2), ["0", "2"])
    if kind == "convtranspose3d":
        return (nn.Sequential(nn.ConvTranspose3d(2, 2, 2, stride=(1, 2, 1), padding=(1, 0, 0)), nn.Tanh(),
                              nn.ConvTranspose3d(2, 2, (2, 1, 1), groups=2)), (2, 2, 2, 2), ["0", "2"])
    if kind == "attention":  # bare in_proj_weight and out_proj, solved at their F.linear calls
        return (SelfAttention(), (3, 4), ["att.parametrizations.in_proj_weight.original",
                                          "att.out_proj.parametrizations.weight.original", "fc"])
    raise ValueError(kind)


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.att = nn.MultiheadAttention(4, 2, batch_first=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.tanh(self.att(x, x, x, need_weights=False)[0]))


KINDS = ["linear", "linear-3d", "conv1d", "conv2d", "conv2d-depthwise", "conv3d", "convtranspose1d",
         "convtranspose2d", "convtranspose3d", "attention"]


def setup(kind, cascade, lam, device, nbar=3, n=2, seed=0):
    torch.manual_seed(seed)
    model, shape, names = build(kind)
    model = model.to(device=device, dtype=DT)
    gen = torch.Generator().manual_seed(seed + 1)
    ref = torch.randn(nbar, *shape, generator=gen, dtype=DT).to(device)
    x = torch.randn(n, *shape, generator=gen, dtype=DT).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tp.RankDeficientWarning)
        tp.to_target_space(model, ref, lam=lam, init="random", cascade=cascade)
    keys = [name if ".parametrizations." in name else f"{name}.parametrizations.weight.original" for name in names]
    targets = []
    for k in keys:  # random targets, off the projected point (so the (T − S) terms are active)
        t = dict(model.named_parameters())[k].detach()
        targets.append((t + 0.5 * torch.randn(t.shape, generator=gen, dtype=DT).to(device)).requires_grad_(True))
    return model, keys, targets, x


def as_function(model, keys, x):
    def f(*targets):
        return functional_call(model, dict(zip(keys, targets)), (x,))
    return f


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("cascade", ["sequential", "optimistic"])
@pytest.mark.parametrize("lam", [1e-3, 0.3])
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_realisation(kind, lam, cascade, device):
    model, keys, targets, x = setup(kind, cascade, lam, device)
    f = as_function(model, keys, x)
    out = f(*targets)
    assert out.requires_grad and out.dtype == DT
    # the function really depends on every target (else gradcheck would pass trivially)
    for i, t in enumerate(targets):
        g = torch.autograd.grad(out.sum(), t, retain_graph=True)[0]
        assert g.abs().max() > 1e-8, f"output does not depend on target {i}"
    assert gradcheck(f, tuple(targets), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=False)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("cascade", ["sequential", "optimistic"])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_gradgradcheck_realisation(kind, cascade, device):
    """Second derivatives through the solve (used by e.g. Hessian-vector products)."""
    model, keys, targets, x = setup(kind, cascade, 0.3, device, nbar=2, n=1)
    f = as_function(model, keys, x)
    assert gradgradcheck(f, tuple(targets), eps=1e-6, atol=1e-5, rtol=1e-3, fast_mode=True)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("cascade", ["sequential", "optimistic"])
def test_gradcheck_loss_matches_module_backward(cascade, device):
    """The functional_call path and the ordinary ``loss.backward()`` on the converted module agree, and the
    swapped-in targets leave the model's own targets untouched."""
    model, keys, targets, x = setup("conv2d", cascade, 0.3, device)
    f = as_function(model, keys, x)
    params = dict(model.named_parameters())
    saved = [params[k].detach().clone() for k in keys]
    loss = (f(*targets) ** 2).sum()
    grads = torch.autograd.grad(loss, targets)
    for k, s in zip(keys, saved):
        assert torch.equal(params[k].detach(), s)
    with torch.no_grad():
        for k, t in zip(keys, targets):
            params[k].copy_(t)
    model.zero_grad()
    (model(x) ** 2).sum().backward()
    for k, g in zip(keys, grads):
        torch.testing.assert_close(params[k].grad, g, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ the ridge Function itself (solver._Ridge)
@pytest.mark.parametrize("form", ["primal", "dual", "fixed-dual"])
@pytest.mark.parametrize("used", ["all", "weight", "bias", "sums"])
@pytest.mark.parametrize("split", [False, True])
def test_gradcheck_ridge_solve(form, used, split):
    """``ridge_solve`` with the bias column (eq. 2a) against central differences, and its values against
    ``ridge_autograd`` (plain autograd through eq. 7 / eq. 23): primal, dual and the fixed dual input's
    projections; W as one tensor or split into weight rows and bias row, with only some outputs used (the
    others' gradients are None in backward)."""
    from target_param import solver

    gen = torch.Generator().manual_seed(11)
    n, d = (9, 3) if form == "primal" else (4, 6)
    x = torch.randn(n, d, generator=gen, dtype=DT, requires_grad=form != "fixed-dual")
    y = torch.randn(n, 2, generator=gen, dtype=DT, requires_grad=True)
    lam = 0.3

    def f(x, y):
        solves = solver.Solves(lam, fixed=(x,) if form == "fixed-dual" else ())
        wt, s = solver.ridge_solve(x, y, solves, "l", solver.FactorCache(), ones=True,
                                   fixed=solves.is_fixed(x), split=split)
        w, b = (wt[0].mT, wt[1]) if split else (wt[:-1], wt[-1])  # split: nn.Linear's (weight, bias)
        return {"all": (w, b, s), "weight": (w,), "bias": (b,), "sums": (s,)}[used]

    one = torch.cat([x, torch.ones(n, 1, dtype=DT)], 1)
    ref = solver.ridge_autograd(one, y, lam, "l")
    w, b, s = f(x, y) if used == "all" else (None, None, None)
    if w is not None:
        torch.testing.assert_close(w, ref[:-1], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(b, ref[-1], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(s, one @ ref, rtol=1e-10, atol=1e-12)
    inputs = (x, y) if x.requires_grad else (y,)
    assert gradcheck(lambda *a: f(*(a if x.requires_grad else (x, *a))), inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("form", ["primal", "dual"])
def test_gradcheck_ridge_solve_split_without_bias(form):
    """``split`` without the bias column: nn.Linear's weight (o, d) alone, against plain autograd and
    central differences (weight and sums used together, and each alone)."""
    from target_param import solver

    gen = torch.Generator().manual_seed(12)
    n, d = (9, 3) if form == "primal" else (4, 6)
    x = torch.randn(n, d, generator=gen, dtype=DT, requires_grad=True)
    y = torch.randn(n, 2, generator=gen, dtype=DT, requires_grad=True)
    ref = solver.ridge_autograd(x, y, 0.3, "l")
    (w, b), s = solver.ridge_solve(x, y, solver.Solves(0.3), "l", split=True)
    assert b is None
    torch.testing.assert_close(w, ref.mT, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s, x @ ref, rtol=1e-10, atol=1e-12)
    for pick in ((0, 1), (0,), (1,)):
        def f(x, y):
            (w, _), s = solver.ridge_solve(x, y, solver.Solves(0.3), "l", split=True)
            return tuple((w, s)[i] for i in pick)
        assert gradcheck(f, (x, y), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("kw", [dict(padding=1), dict(stride=2, padding=1, padding_mode="reflect")],
                         ids=["same", "s2-reflect"])
def test_gradcheck_max_positions(kw, device):
    """The approximate option (``max_positions``, section 4.2): both convs solved on a subset of patch
    columns, so the second one's gathered patches carry the gradient back to the first one's targets."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, **kw), nn.Tanh(), nn.Conv2d(3, 2, 3, **kw)).to(device=device, dtype=DT)
    gen = torch.Generator().manual_seed(6)
    ref, x = (torch.randn(n, 2, 5, 5, generator=gen, dtype=DT).to(device) for n in (3, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tp.RankDeficientWarning)
        tp.to_target_space(model, ref, lam=0.3, init="random", max_positions=10)
    keys = [f"{i}.parametrizations.weight.original" for i in (0, 2)]
    params = dict(model.named_parameters())
    assert all(params[k].shape[0] == 10 for k in keys)  # both layers solved on the subset
    targets = [(params[k].detach() + 0.5 * torch.randn(params[k].shape, generator=gen, dtype=DT).to(device))
               .requires_grad_(True) for k in keys]
    f = as_function(model, keys, x)
    (g,) = torch.autograd.grad(f(*targets).sum(), targets[0])
    assert g.abs().max() > 1e-8  # the first layer's targets reach the output
    # CUDA's reflect-padding backward accumulates with atomics: repeated backwards differ in the last bits
    nondet = 0.0 if device == "cpu" else 1e-10
    assert gradcheck(f, tuple(targets), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=False, nondet_tol=nondet)
