"""The shift-structured Gram of stride-1 convs (paper footnote 3) equals the im2col Gram to rounding."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import target_param as tp
from target_param import layers
from target_param.layers import ConvAdapter

CASES = [
    (nd, k, dil, g, pad, mode, bias)
    for nd, k, dil, g, pad, mode, bias in itertools.product(
        [1, 2], [1, 2, 3, (3, 2), (5, 3)], [1, 2], [1, 2], [0, 1, 2, "same"], ["zeros", "reflect"], [True, False])
    if not (nd == 1 and isinstance(k, tuple)) and not (mode == "reflect" and pad == 0)
]


def unfold_gram(conv: nn.Conv2d, xp: torch.Tensor, bias: bool) -> torch.Tensor:
    """Independent reference: F.unfold of the padded input, per group, with a ones column."""
    cols = F.unfold(xp, conv.kernel_size, dilation=conv.dilation)  # (n, C·k, P)
    g = conv.groups
    n, ck, p = cols.shape
    a = cols.reshape(n, g, ck // g, p).permute(1, 0, 3, 2).reshape(g, n * p, ck // g)
    if bias:
        a = torch.cat([a, a.new_ones(g, n * p, 1)], -1)
    return a.mT @ a


@pytest.mark.parametrize("assembly", ["copies", "gather"])  # the CPU's block copies, the GPU's one gather
@pytest.mark.parametrize("nd,k,dil,g,pad,mode,bias", CASES)
def test_shift_gram_equals_im2col_gram(nd, k, dil, g, pad, mode, bias, assembly, monkeypatch):
    from target_param import gram

    monkeypatch.setattr(gram, "GATHER_DEVICES", {"cuda", "cpu"} if assembly == "gather" else {"cuda"})
    torch.manual_seed(0)
    conv = (nn.Conv1d if nd == 1 else nn.Conv2d)(4, 6, k, dilation=dil, groups=g, padding=pad,
                                                 padding_mode=mode, bias=bias).double()
    ad = ConvAdapter(conv)
    x = torch.randn(3, 4, *((21,) if nd == 1 else (21, 20)), dtype=torch.float64)
    xp = ad.pad_input(x)
    out = [s - d * (kk - 1) for s, d, kk in zip(xp.shape[2:], ad.dilation, ad.kernel_size)]
    assert min(out) >= layers._SHIFT_GRAM_MIN  # the shift path is the one under test
    conv2d = nn.Conv2d(4, 6, ((1,) + ad.kernel_size)[-2:], dilation=((1,) + ad.dilation)[-2:], groups=g)
    reference = unfold_gram(conv2d, xp if nd == 2 else xp[:, :, None], bias)
    got = ad.gram_of(x if ad.native else xp)
    assert torch.allclose(got, reference, rtol=1e-12, atol=1e-10 * reference.abs().max())


def test_large_conv_realises_eq6_through_shift_gram():
    """End to end: a conv big enough for the shift path realises W = T A^‡ computed by F.unfold."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    ref = torch.randn(2, 3, 18, 18, dtype=torch.float64)
    tp.to_target_space(conv, ref, lam=0.05, init="random")
    a = F.unfold(F.pad(ref, (1, 1, 1, 1)), 3).transpose(1, 2).reshape(-1, 27)
    a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
    t = conv.parametrizations.weight.original.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    w = torch.linalg.solve(a.T @ a + 0.05 * torch.eye(28, dtype=a.dtype), a.T @ t).T
    assert torch.allclose(conv.weight.reshape(4, -1), w[:, :-1], atol=1e-10)
    assert torch.allclose(conv.bias, w[:, -1], atol=1e-10)
