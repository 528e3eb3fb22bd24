"""The Gram ``AAᵀ`` of a stride-1 convolution's patches without im2col (paper footnote 3).

Neighbouring patches overlap, so block ``((c,a,b), (c',a',b'))`` of the Gram, kernel offsets (a, b) and
(a', b'), is the correlation of input channels c and c' at the shift ``δ = (a'−a, b'−b)``, summed over the
window of offset (a, b). Summed over the *whole* input instead, the correlation ``F(δ)`` depends on δ only:
the (2kh−1)(2kw−1) shifts, half of them by symmetry, replace the (kh·kw)² blocks. Each block is then
``F(δ)`` minus the few border rows and columns that lie outside its window (inclusion–exclusion).

Layout: the input is copied once into a flat buffer (C, rows × images × columns) with ``dilation·(k−1)``
zero columns after each image row and zero rows at the end; a shift is then a fixed offset into the buffer,
``F(δ)`` one matrix product (C × P)·(P × C), and a border row of every image one contiguous slice. ``core`` is the part of the
padded input that may be non-zero: with zero padding the unpadded input, whose padding (``pad``) only
clips the windows.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["shift_gram", "GATHER_DEVICES"]

# Device types where the Gram is assembled from the shift table by one gather (a launch) instead of kh²·kw
# block copies (each a few dispatched ops): where the host's dispatch, not memory traffic, bounds the step.
GATHER_DEVICES = {"cuda"}


def _outside(n: int, lo: int, hi: int, shift: int) -> list[slice]:
    """Rows of [0, n) outside the window [lo, hi) whose partner ``row + shift`` is in [0, n)."""
    a, b = max(0, -shift), min(n, n - shift)
    return [slice(i, j) for i, j in ((a, min(b, lo)), (max(a, hi), b)) if j > i]


def shift_gram(core: Tensor, groups: int, kernel: tuple[int, int], dilation: tuple[int, int],
               pad: tuple[int, int, int, int]) -> tuple[Tensor, Tensor]:
    """Gram ``XᵀX`` (G, d, d) and column sums (G, d) of the stride-1 patches of ``core`` (n, C, h, w)
    zero-padded by ``pad`` = (top, bottom, left, right); d = C/G·kh·kw, ordered like a conv weight."""
    n, c, h, w = core.shape
    cg, (kh, kw), (dh, dw) = c // groups, kernel, dilation
    top, bottom, left, right = pad
    gh, gw = dh * (kh - 1), dw * (kw - 1)
    ho, wo = h + top + bottom - gh, w + left + right - gw  # output positions per image
    wr = w + gw
    line = n * wr  # one input row of every image
    # (C, rows, images, columns), flat: a shift by (sa, sb) is the offset dh·sa·line + dw·sb; the zero
    # columns after each image row and the zero rows at the end catch every product that leaves the image.
    buf = core.new_empty(c, gw + (h + gh) * line + gw)
    body = buf[:, gw:gw + (h + gh) * line].view(c, h + gh, n, wr)
    body[:, :h, :, :w] = core.permute(1, 2, 0, 3)
    body[:, :h, :, w:] = 0
    body[:, h:] = 0
    buf[:, :gw] = 0
    buf[:, gw + (h + gh) * line:] = 0

    def at(row: int, sa: int, sb: int, rows: int = h) -> Tensor:  # ``rows`` input rows from ``row``, shifted
        start = gw + (row + dh * sa) * line + dw * sb
        return buf[:, start:start + rows * line].reshape(groups, cg, -1)

    # F(sa, sb) for the half plane sa > 0 or (sa = 0, sb ≥ 0); the rest are transposes.
    table = core.new_empty(groups, cg, cg, 2 * kh - 1, 2 * kw - 1)  # [..., kh−1+sa, kw−1+sb]
    first = at(0, 0, 0)
    for sa in range(kh):
        for sb in range(0 if sa == 0 else 1 - kw, kw):
            f = first @ at(0, sa, sb).mT
            table[..., kh - 1 + sa, kw - 1 + sb] = f
            if sa or sb:
                table[..., kh - 1 - sa, kw - 1 - sb] = f.mT
    # block (c,a,b), (c',a',b') = F(a'−a, b'−b)
    ib = torch.arange(kw, device=core.device)
    sb_of = ib[None] - ib[:, None] + kw - 1  # [b, b']
    if core.device.type in GATHER_DEVICES:
        ia = torch.arange(kh, device=core.device)
        sa_of = ia[None] - ia[:, None] + kh - 1  # [a, a']
        # one gather of the table, written once in the Gram's layout (G, cg, a, b, c', a', b'): the three
        # indexed dims (shift a, shift b, c') broadcast to (a, b, c', a', b')
        channel = torch.arange(cg, device=core.device)[None, None, :, None, None]
        gram = table.permute(0, 1, 3, 4, 2)[:, :, sa_of[:, None, None, :, None], sb_of[None, :, None, None, :],
                                            channel]
    else:  # block copies: faster than a gather on the CPU, 2× at C = 512
        gram = core.new_empty(groups, cg, kh, kw, cg, kh, kw)
        for a in range(kh):
            for a2 in range(kh):
                for b in range(kw):
                    gram[:, :, a, b, :, a2, :] = table[..., kh - 1 + a2 - a, kw - 1 - b:2 * kw - 1 - b]

    # Border rows: kernel row a's window leaves out rows E of the input, for row shift sa, every sb.
    row_out = {}
    for a in range(kh):
        for sa in range(kh - a):
            e = _outside(h, dh * a - top, dh * a - top + ho, dh * sa)
            if e:
                row_out[a, sa] = e
                r = torch.stack([sum(at(s.start, 0, 0, s.stop - s.start) @ at(s.start, sa, sb, s.stop - s.start).mT
                                     for s in e) for sb in range(1 - kw, kw)], -1)[..., sb_of]
                gram[:, :, a, :, :, a + sa, :] -= r.permute(0, 1, 3, 2, 4)
                if sa:
                    gram[:, :, a + sa, :, :, a, :] -= r.permute(0, 2, 4, 1, 3)
    # Border columns: kernel column b's window leaves out columns E, for column shift sb, every sa ≥ 0;
    # where a border row meets a border column the product was taken twice: add it back. The few columns
    # involved are gathered once, (rows, images) flat, so that a row shift is an offset.
    col_out = {(b, sb): [j for s in _outside(w, dw * b - left, dw * b - left + wo, dw * sb)
                         for j in range(s.start, s.stop)]
               for b in range(kw) for sb in range(-b, kw - b)}
    col_out = {k: e for k, e in col_out.items() if e}
    if col_out:
        needed = sorted({j + dw * sb * k for (b, sb), e in col_out.items() for j in e for k in (0, 1)})
        slot = {j: i for i, j in enumerate(needed)}
        picked = body[..., needed].permute(3, 0, 1, 2).reshape(len(needed), groups, cg, (h + gh) * n)

        def column(j: int, sa: int, rows: slice = slice(0, h)) -> Tensor:  # (G, cg, rows·n)
            return picked[slot[j], :, :, (rows.start + dh * sa) * n:(rows.stop + dh * sa) * n]

    for (b, sb), e in col_out.items():
        col = [sum(column(j, 0) @ column(j + dw * sb, sa).mT for j in e) for sa in range(kh)]
        for a in range(kh):
            for sa in range(kh - a):
                fix = col[sa]
                for r in row_out.get((a, sa), ()):
                    fix = fix - sum(column(j, 0, r) @ column(j + dw * sb, sa, r).mT for j in e)
                gram[:, :, a, b, :, a + sa, b + sb] -= fix
                if sa:
                    gram[:, :, a + sa, b + sb, :, a, b] -= fix.mT
    total = core.sum(0)
    sums = torch.stack([
        total[:, max(0, dh * a - top):dh * a - top + ho, max(0, dw * b - left):dw * b - left + wo].sum((-2, -1))
        for a in range(kh) for b in range(kw)], -1)
    d = cg * kh * kw
    return gram.reshape(groups, d, d), sums.reshape(groups, d)
