"""The Gram ``AAᵀ`` of a stride-1 convolution's patches without im2col (paper footnote 3).

Neighbouring patches overlap, so block ``((c,a,b), (c',a',b'))`` of the Gram, kernel offsets (a, b) and
(a', b'), is the correlation of input channels c and c' at the shift ``δ = (a'−a, b'−b)``, summed over the
window of offset (a, b). Summed over the *whole* input instead, the correlation ``F(δ)`` depends on δ only:
the (2kh−1)(2kw−1) shifts, half of them by symmetry, replace the (kh·kw)² blocks. Each block is then
``F(δ)`` minus the few border rows and columns that lie outside its window (inclusion–exclusion).

Layout: the input is copied once, channel-major, into a flat buffer (C, n·Hr·Wr) whose rows and columns
carry ``dilation·(k−1)`` zeros after each image row and each image; a shift is then a fixed offset into the
buffer and ``F(δ)`` one matrix product (C × P)·(P × C), with no copy per shift. ``core`` is the part of the
padded input that may be non-zero: with zero padding the unpadded input, whose padding (``pad``) only
clips the windows.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["shift_gram"]


def _outside(n: int, lo: int, hi: int, shift: int) -> list[slice]:
    """Rows of [0, n) outside the window [lo, hi) whose partner ``row + shift`` is in [0, n)."""
    a, b = max(0, -shift), min(n, n - shift)
    return [slice(i, j) for i, j in ((a, min(b, lo)), (max(a, hi), b)) if j > i]


def _moved(s: slice, by: int) -> slice:
    return slice(s.start + by, s.stop + by)


def shift_gram(core: Tensor, groups: int, kernel: tuple[int, int], dilation: tuple[int, int],
               pad: tuple[int, int, int, int]) -> tuple[Tensor, Tensor]:
    """Gram ``XᵀX`` (G, d, d) and column sums (G, d) of the stride-1 patches of ``core`` (n, C, h, w)
    zero-padded by ``pad`` = (top, bottom, left, right); d = C/G·kh·kw, ordered like a conv weight."""
    n, c, h, w = core.shape
    cg, (kh, kw), (dh, dw) = c // groups, kernel, dilation
    top, bottom, left, right = pad
    gh, gw = dh * (kh - 1), dw * (kw - 1)
    ho, wo = h + top + bottom - gh, w + left + right - gw  # output positions per image
    hr, wr = h + gh, w + gw
    p = n * hr * wr
    buf = core.new_zeros(c, gw + p + gh * wr + gw)  # room for every shifted view
    buf[:, gw:gw + p].view(c, n, hr, wr)[:, :, :h, :w] = core.transpose(0, 1)

    def at(sa: int, sb: int) -> Tensor:  # the buffer shifted by (dh·sa, dw·sb), as images (C, n, hr, wr)
        start = gw + dh * sa * wr + dw * sb
        return buf[:, start:start + p].view(c, n, hr, wr)

    def grouped(t: Tensor) -> Tensor:
        return t.reshape(groups, cg, -1)

    # F(sa, sb) for the half plane sa > 0 or (sa = 0, sb ≥ 0); the rest are transposes.
    table = core.new_empty(groups, cg, cg, 2 * kh - 1, 2 * kw - 1)  # [..., kh−1+sa, kw−1+sb]
    base = at(0, 0)
    first = grouped(base)
    for sa in range(kh):
        for sb in range(0 if sa == 0 else 1 - kw, kw):
            f = first @ grouped(at(sa, sb)).mT
            table[..., kh - 1 + sa, kw - 1 + sb] = f
            if sa or sb:
                table[..., kh - 1 - sa, kw - 1 - sb] = f.mT
    ib = torch.arange(kw, device=core.device)
    sb_of = ib[None] - ib[:, None] + kw - 1  # [b, b']
    gram = core.new_empty(groups, cg, kh, kw, cg, kh, kw)  # block (c,a,b), (c',a',b') = F(a'−a, b'−b)
    for a in range(kh):
        for a2 in range(kh):
            for b in range(kw):
                gram[:, :, a, b, :, a2, :] = table[..., kh - 1 + a2 - a, kw - 1 - b:2 * kw - 1 - b]

    def strip(one: Tensor, partners: list[Tensor]) -> Tensor:
        """Σ one·partnerᵀ over positions, for each partner: (G, cg, cg, len(partners))."""
        b = torch.stack([grouped(q) for q in partners], 1)  # (G, S, cg, L)
        return (grouped(one)[:, None] @ b.mT).permute(0, 2, 3, 1)

    def rows(t: Tensor, sl: list[slice]) -> Tensor:
        return torch.cat([t[:, :, s] for s in sl], 2)

    # Border rows: kernel row a's window leaves out rows E of the input, for row shift sa, every sb.
    row_out = {}
    for a in range(kh):
        for sa in range(kh - a):
            e = _outside(h, dh * a - top, dh * a - top + ho, dh * sa)
            if e:
                row_out[a, sa] = e
                r = strip(rows(base, e), [rows(at(sa, sb), e) for sb in range(1 - kw, kw)])[..., sb_of]
                gram[:, :, a, :, :, a + sa, :] -= r.permute(0, 1, 3, 2, 4)
                if sa:
                    gram[:, :, a + sa, :, :, a, :] -= r.permute(0, 2, 4, 1, 3)
    # Border columns: kernel column b's window leaves out columns E, for column shift sb, every sa ≥ 0;
    # where a border row meets a border column the product was taken twice: add it back. The few columns
    # involved are gathered once, each with the zero rows after every image, so a row shift is an offset.
    col_out = {(b, sb): [j for s in _outside(w, dw * b - left, dw * b - left + wo, dw * sb) for j in range(s.start, s.stop)]
               for b in range(kw) for sb in range(-b, kw - b)}
    col_out = {k: e for k, e in col_out.items() if e}
    needed = sorted({j + dw * sb * k for (b, sb), e in col_out.items() for j in e for k in (0, 1)})
    if needed:
        slot = {j: i for i, j in enumerate(needed)}
        picked = core.new_zeros(len(needed), c, n * hr + gh)
        picked[:, :, :n * hr] = base[..., needed].permute(3, 0, 1, 2).reshape(len(needed), c, n * hr)

        def column(j: int, sa: int) -> Tensor:  # column j, shifted by dh·sa rows: (C, n, hr)
            return picked[slot[j], :, dh * sa:dh * sa + n * hr].view(c, n, hr)
    for (b, sb), e in col_out.items():
        col = sum(strip(column(j, 0), [column(j + dw * sb, sa) for sa in range(kh)]) for j in e)
        for a in range(kh):
            for sa in range(kh - a):
                fix = col[..., sa]
                for r in row_out.get((a, sa), ()):
                    fix = fix - sum(strip(column(j, 0)[:, :, r], [column(j + dw * sb, sa)[:, :, r]])[..., 0]
                                    for j in e)
                gram[:, :, a, b, :, a + sa, b + sb] -= fix
                if sa:
                    gram[:, :, a + sa, b + sb, :, a, b] -= fix.mT
    total = core.sum(0)
    sums = torch.stack([
        total[:, max(0, dh * a - top):dh * a - top + ho, max(0, dw * b - left):dw * b - left + wo].sum((-2, -1))
        for a in range(kh) for b in range(kw)], -1)
    d = cg * kh * kw
    return gram.reshape(groups, d, d), sums.reshape(groups, d)
