"""nn.ConvTranspose1d/2d/3d against eq. 6 built independently.

The transposed conv's output is linear in its weight, and all output channels of a group share one design
matrix A. Here A is built from ``F.conv_transpose{1,2,3}d`` alone: row (c, k) of group g is the layer's
output channel g·(C_out/G) when the weight is the basis kernel with a single 1 at [g·(C_in/G) + c, 0, k].
No zero-stuffing, flipping or padding arithmetic of the library is involved.
"""
from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import target_param as tp

DT = torch.float64
CT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def design(layer, x, output_padding=None):
    """A_g (G, C_in/G · K, n̄ · positions) of a transposed conv on x, from basis kernels."""
    cin, og = layer.in_channels, layer.out_channels // layer.groups
    g, cg, ks = layer.groups, cin // layer.groups, layer.kernel_size
    out = []
    for gi in range(g):
        rows = []
        for c in range(cg):
            for k in itertools.product(*map(range, ks)):
                basis = torch.zeros(cin, og, *ks, dtype=DT)
                basis[(gi * cg + c, 0, *k)] = 1.0
                y = FN[len(ks)](x, basis, None, layer.stride, layer.padding,
                                layer.output_padding if output_padding is None else output_padding, layer.groups,
                                layer.dilation)
                rows.append(y[:, gi * og].reshape(-1))
        out.append(torch.stack(rows))
    return out


CONFIGS = [dict(stride=2, padding=1, output_padding=1), dict(stride=3, padding=2, dilation=2, groups=2),
           dict(stride=1), dict(stride=2, padding=3, output_padding=1, dilation=2, groups=2, bias=False),
           dict(stride=(2, 1, 3), padding=(0, 1, 1), output_padding=(1, 0, 2), groups=3)]


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("cfg", CONFIGS, ids=[str(i) for i in range(len(CONFIGS))])
@pytest.mark.parametrize("nbar", [1, 4])
def test_conv_transpose_realises_eq6(nd, cfg, nbar):
    cfg = {k: (v[:nd] if isinstance(v, tuple) else v) for k, v in cfg.items()}
    torch.manual_seed(0)
    layer = CT[nd](6, 6, 2 if nd == 3 else 3, **cfg).to(DT)
    x = torch.randn(nbar, 6, *[3] * nd, dtype=DT)
    lam = 0.05
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tp.RankDeficientWarning)
        tp.to_target_space(layer, x, lam=lam, init="random")
    t = layer.parametrizations.weight.original  # the shape of the output
    g, og = layer.groups, layer.out_channels // layer.groups
    with torch.no_grad():
        assert t.shape == FN[nd](x, layer.weight, None, layer.stride, layer.padding, layer.output_padding,
                                 layer.groups, layer.dilation).shape
        for gi, a in enumerate(design(layer, x)):
            if layer.bias is not None:
                a = torch.cat([a, torch.ones(1, a.shape[1], dtype=DT)])
            tg = t[:, gi * og:(gi + 1) * og].transpose(0, 1).reshape(og, -1)  # (o, n̄·positions)
            w = torch.linalg.solve(a @ a.T + lam * torch.eye(a.shape[0], dtype=DT), a @ tg.T).T  # T Aᵀ(AAᵀ+λI)⁻¹
            cg = layer.in_channels // g
            got = layer.weight[gi * cg:(gi + 1) * cg].transpose(0, 1).reshape(og, -1)
            if layer.bias is not None:
                got = torch.cat([got, layer.bias[gi * og:(gi + 1) * og, None]], 1)
            assert torch.allclose(got, w, rtol=1e-9, atol=1e-11)


def test_output_size_argument_and_unbatched_input():
    torch.manual_seed(0)

    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1)

        def forward(self, x):
            return self.up(x, output_size=(2 * x.shape[-2], 2 * x.shape[-1]))  # output_padding 1, chosen per call
    model = Up().to(DT)
    x = torch.randn(3, 3, 4, 4, dtype=DT)
    lam = 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tp.TraceFallbackWarning)
        tp.to_target_space(model, x, lam=lam, init="random")
    t = model.up.parametrizations.weight.original
    assert t.shape == (3, 2, 8, 8)
    with torch.no_grad():
        a = torch.cat([design(model.up, x, output_padding=(1, 1))[0], torch.ones(1, 3 * 64, dtype=DT)])
        w = torch.linalg.solve(a @ a.T + lam * torch.eye(28, dtype=DT), a @ t.transpose(0, 1).reshape(2, -1).T).T
        assert torch.allclose(model.up.weight.transpose(0, 1).reshape(2, -1), w[:, :-1], rtol=1e-9, atol=1e-11)
    single = CT[1](2, 3, 3, stride=2).to(DT)
    xs = torch.randn(2, 5, dtype=DT)  # unbatched (C, L)
    y0 = single(xs)
    tp.to_target_space(single, xs, lam=1e-12)
    assert single.parametrizations.weight.original.shape == y0.shape
    assert torch.allclose(single(xs), y0, atol=1e-6)


class UNet(nn.Module):
    """A two-level U-Net: strided conv down, transposed conv up, skip concatenation."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1)
        self.out = nn.Conv2d(4 + 3, 2, 1)

    def forward(self, x):
        h = torch.relu(self.mid(torch.relu(self.down(x))))
        return self.out(torch.cat([torch.relu(self.up(h)), x], 1))


def test_unet_with_transposed_conv_converts_trains_and_goes_back():
    torch.manual_seed(0)
    model = UNet()
    keys, classes = list(model.state_dict()), [type(m) for m in model.modules()]
    ref = torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        y0 = model(ref)
    tp.to_target_space(model, ref, lam=1e-6)
    assert tp.is_target_space(model.up)
    with torch.no_grad():
        assert ((model(ref) - y0).norm() / y0.norm()).item() < 1e-4
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    target = torch.randn(8, 2, 8, 8)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = F.mse_loss(model(ref), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    probe = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        y = model(probe)
    tp.to_weight_space(model)
    assert list(model.state_dict()) == keys and [type(m) for m in model.modules()] == classes
    with torch.no_grad():
        assert torch.allclose(model(probe), y, atol=1e-5)
    assert math.isfinite(losses[-1])
