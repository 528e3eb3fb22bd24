"""Attention and every linear map: weights used functionally (F.linear / F.conv* outside their module), bare
Parameters (nn.MultiheadAttention's in_proj_weight, q/k/v_proj_weight), row blocks (cross-attention), the
transformer layers of torch.nn, their fused eval fast paths, and tied weights (see target_param.functional).

Every realised weight is checked against eq. 6 computed here, ``W = T·A^‡`` with ``A`` the input that the use
actually received: recomputed from the realised weights by hand (self-attention written out), or captured by a
forward pre-hook on the module that makes the call. Algorithm 3's gradient on a transformer encoder layer is
checked against autograd through an explicit reference pass and training forward written here.
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import target_param as tp
from conftest import assert_same_state, model_state, weight_space_maps

DT = torch.float64
E, H, FF = 8, 2, 12


def ridge(a, t, lam):
    """Eq. 6 in row layout: patterns ``a`` (N, d), targets ``t`` (N, o) → (W (o, d), b (o,)), with the ones
    column of the bias; λ on the unnormalised Gram, bias row included."""
    a1 = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
    w = torch.linalg.solve(a1.T @ a1 + lam * torch.eye(a1.shape[1], dtype=a.dtype), a1.T @ t).T
    return w[:, :-1], w[:, -1]


def rows(x):
    return x.reshape(-1, x.shape[-1])


def close(a, b, tol=1e-9):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item() < tol


def attention(q, k, v, heads, mask=None):
    """Scaled dot-product attention on (L, N, E) inputs, heads split as nn.MultiheadAttention splits them."""
    L, N, E_ = q.shape
    hd = E_ // heads

    def split(x):
        return x.reshape(x.shape[0], N * heads, hd).transpose(0, 1)
    s = split(q) @ split(k).transpose(1, 2) / math.sqrt(hd)
    if mask is not None:
        s = s + mask
    out = torch.softmax(s, -1) @ split(v)
    return out.transpose(0, 1).reshape(L, N, E_)


def targets(model):
    return {n: p for n, p in model.named_parameters() if ".parametrizations." in n and ".original" in n}


def realise(model):
    with torch.no_grad():
        for r in tp.convert.realisers(model):
            r.realise()


# ------------------------------------------------------------------------------------------ eq. 6 at each use
class SelfAttention(nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        self.pre = nn.Linear(E, E)
        self.att = nn.MultiheadAttention(E, H, batch_first=batch_first)

    def forward(self, x):
        h = torch.tanh(self.pre(x))
        return self.att(h, h, h, need_weights=False)[0]


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_in_and_out_projections_solve_eq6(batch_first):
    torch.manual_seed(0)
    model = SelfAttention(batch_first).to(DT)
    ref = torch.randn(6, 5, E, dtype=DT)  # (N, L, E) or (L, N, E)
    lam = 1e-3
    tp.to_target_space(model, ref, lam=lam, init="random", target_std=0.5)
    assert not weight_space_maps(model)
    att = model.att
    with torch.no_grad():
        h = torch.tanh(F.linear(ref, model.pre.weight, model.pre.bias))
        seq = h.transpose(0, 1) if batch_first else h  # (L, N, E): how F.multi_head_attention_forward runs
        w_in, b_in = ridge(rows(seq), rows(att.parametrizations.in_proj_weight.original), lam)
        assert close(att.in_proj_weight, w_in) and close(att.in_proj_bias, b_in)
        q, k, v = (rows(seq) @ w_in.T + b_in).reshape(*seq.shape[:2], 3 * E).chunk(3, -1)
        a = attention(q, k, v, H)
        w_out, b_out = ridge(rows(a), att.out_proj.parametrizations.weight.original, lam)
        assert close(att.out_proj.weight, w_out) and close(att.out_proj.bias, b_out)
        # SCU: the reference pass hands on S_j = W A, so the model's output on X̄ is computed with these weights
        out = (rows(a) @ w_out.T + b_out).reshape(seq.shape)
        assert close(model(ref), out.transpose(0, 1) if batch_first else out)


class Functional(nn.Module):
    """Weights used outside their module: a Linear's and a Conv's by F.linear / F.conv2d, and bare Parameters
    (a matrix with a bias, a strided grouped kernel without one)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.kernel = nn.Parameter(torch.randn(6, 2, 3, 3) * 0.3)
        self.fc = nn.Linear(6 * 4, 7)
        self.w = nn.Parameter(torch.randn(3, 7) * 0.3)
        self.b = nn.Parameter(torch.zeros(3))

    def forward(self, x):
        c = self.conv
        h = torch.tanh(F.conv2d(x, c.weight, c.bias, c.stride, c.padding))
        h = torch.tanh(F.conv2d(h, self.kernel, None, 2, 0, 1, 2))  # bare, stride 2, groups 2, no bias
        h = torch.tanh(F.linear(h.flatten(1), self.fc.weight, self.fc.bias))
        return F.linear(h, self.w, self.b)


@pytest.mark.parametrize("trace", [True, False])
def test_functional_and_bare_uses_solve_eq6_from_the_input_of_the_use(trace):
    torch.manual_seed(0)
    model = Functional().to(DT)
    ref = torch.randn(5, 2, 5, 5, dtype=DT)
    lam = 1e-2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tp.RankDeficientWarning)
        tp.to_target_space(model, ref, lam=lam, init="random", target_std=0.5, trace=trace)
    names = [layer.name for r in tp.convert.realisers(model) for layer in r.layers]
    assert names == ["conv", "kernel", "fc", "w"]  # forward order
    with torch.no_grad():
        # conv: im2col by F.unfold of the input it received (the reference batch)
        a = F.unfold(ref, 3, padding=1).transpose(1, 2)  # (n, positions, 2·9)
        t = model.conv.parametrizations.weight.original  # (n, 4, 5, 5)
        w, b = ridge(rows(a), rows(t.flatten(2).transpose(1, 2)), lam)
        assert close(model.conv.weight.flatten(1), w) and close(model.conv.bias, b)
        h = torch.tanh(F.conv2d(ref, model.conv.weight, model.conv.bias, 1, 1))
        # the bare grouped kernel, stride 2: one problem per group, no bias row
        t = model.parametrizations.kernel.original  # (n, 6, 2, 2)
        for g in range(2):
            a = F.unfold(h[:, 2 * g:2 * g + 2], 3, stride=2).transpose(1, 2)  # 2 input channels per group
            tg = rows(t[:, 3 * g:3 * g + 3].flatten(2).transpose(1, 2))
            want = torch.linalg.solve(rows(a).T @ rows(a) + lam * torch.eye(18, dtype=DT), rows(a).T @ tg).T
            assert close(model.kernel[3 * g:3 * g + 3].flatten(1), want)
        h = torch.tanh(F.conv2d(h, model.kernel, None, 2, 0, 1, 2)).flatten(1)
        w, b = ridge(h, model.fc.parametrizations.weight.original, lam)
        assert close(model.fc.weight, w) and close(model.fc.bias, b)
        h = torch.tanh(F.linear(h, model.fc.weight, model.fc.bias))
        w, b = ridge(h, model.parametrizations.w.original, lam)
        assert close(model.w, w) and close(model.b, b)
    assert sorted(model.state_dict()) == sorted([
        "target_space_reference", "conv.parametrizations.weight.original", "parametrizations.kernel.original",
        "fc.parametrizations.weight.original", "parametrizations.w.original"])
    # a deep copy (EMA, a twin) reads its own bare tensors, in the traced graph too
    twin = copy.deepcopy(model)
    x = torch.randn(2, 2, 5, 5, dtype=DT)
    with torch.no_grad():
        y = model(x)
        assert torch.equal(twin(x), y)
        twin.parametrizations.w.original.mul_(2.0)
        assert not torch.allclose(twin(x), y) and torch.equal(model(x), y)


def test_an_external_bias_is_added_to_the_solved_map():
    """beit/eva style: F.linear(x, qkv.weight, cat(q_bias, 0, v_bias)) on a Linear without a bias. The target
    is the use's output less that bias, W solves eq. 6 without a ones row, and the bias stays a trained
    weight-space Parameter."""
    torch.manual_seed(0)

    class BeitLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(E, 3 * E, bias=False)
            self.q_bias, self.v_bias = nn.Parameter(torch.randn(E)), nn.Parameter(torch.randn(E))
            self.out = nn.Linear(3 * E, 2)

        def forward(self, x):
            b = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
            return self.out(torch.tanh(F.linear(x, self.qkv.weight, b)))
    model = BeitLike().to(DT)
    ref = torch.randn(30, E, dtype=DT)
    with torch.no_grad():
        y0 = model(ref)
        t0 = ref @ model.qkv.weight.T  # what the target must be: the output less the external bias
    lam = 1e-10
    tp.to_target_space(model, ref, lam=lam)
    t = model.qkv.parametrizations.weight.original
    assert close(t, t0, 1e-12)
    with torch.no_grad():
        assert close(model(ref), y0, 1e-8)
        want = torch.linalg.solve(ref.T @ ref + lam * torch.eye(E, dtype=DT), ref.T @ t).T
        assert close(model.qkv.weight, want)
    model(torch.randn(5, E, dtype=DT)).sum().backward()
    assert model.q_bias.grad.abs().sum() > 0 and t.grad.abs().sum() > 0


def test_cross_attention_blocks_solve_from_query_and_memory_with_a_causal_mask():
    torch.manual_seed(0)
    dec = nn.TransformerDecoderLayer(E, H, FF, dropout=0.0, batch_first=True).to(DT)
    mask = nn.Transformer.generate_square_subsequent_mask(5, dtype=DT)

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.dec = dec

        def forward(self, x, memory):
            return self.dec(x, memory, tgt_mask=mask, tgt_is_causal=True)
    model = Decoder()
    x, memory = torch.randn(4, 5, E, dtype=DT), torch.randn(4, 7, E, dtype=DT)
    lam = 1e-3
    tp.to_target_space(model, (x, memory), lam=lam, init="random", target_std=0.5)
    assert not weight_space_maps(model)
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(name, args))
             for name, m in (("self", dec.self_attn), ("cross", dec.multihead_attn))]
    realise(model)
    for hk in hooks:
        hk.remove()
    with torch.no_grad():
        cross = dec.multihead_attn
        p = cross.parametrizations.in_proj_weight
        assert p.original.shape == (5, 4, E) and p.original1.shape == (7, 4, 2 * E)  # (L, N, E), (S, N, 2E)
        query, key, value = (t.transpose(0, 1) for t in seen["cross"][:3])
        assert torch.equal(key, memory.transpose(0, 1)) and value is not None
        w, b = ridge(rows(query), rows(p.original), lam)  # the query rows, on the target sequence
        assert close(cross.in_proj_weight[:E], w) and close(cross.in_proj_bias[:E], b)
        w, b = ridge(rows(key), rows(p.original1), lam)  # the key/value rows, on the memory
        assert close(cross.in_proj_weight[E:], w) and close(cross.in_proj_bias[E:], b)
        # self-attention with the causal mask: its out_proj solved from the masked attention
        s = seen["self"][0].transpose(0, 1)
        w_in, b_in = ridge(rows(s), rows(dec.self_attn.parametrizations.in_proj_weight.original), lam)
        assert close(dec.self_attn.in_proj_weight, w_in)
        q, k, v = (rows(s) @ w_in.T + b_in).reshape(*s.shape[:2], 3 * E).chunk(3, -1)
        a = attention(q, k, v, H, mask)
        w, b = ridge(rows(a), dec.self_attn.out_proj.parametrizations.weight.original, lam)
        assert close(dec.self_attn.out_proj.weight, w) and close(dec.self_attn.out_proj.bias, b)


def test_kdim_vdim_projections_share_the_stacked_bias():
    torch.manual_seed(0)

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.att = nn.MultiheadAttention(E, H, kdim=5, vdim=3, batch_first=True)

        def forward(self, q, k, v):
            return self.att(q, k, v)[0]
    model = Cross().to(DT)
    q, k, v = (torch.randn(6, 4, d, dtype=DT) for d in (E, 5, 3))
    lam = 1e-3
    tp.to_target_space(model, (q, k, v), lam=lam, init="random")
    assert not weight_space_maps(model)
    att = model.att
    with torch.no_grad():
        for i, (name, inp) in enumerate((("q_proj_weight", q), ("k_proj_weight", k), ("v_proj_weight", v))):
            w, b = ridge(rows(inp.transpose(0, 1)), rows(att.parametrizations[name].original), lam)
            assert close(getattr(att, name), w) and close(att.in_proj_bias[i * E:(i + 1) * E], b)
    keys = set(model.state_dict())
    assert {"att.parametrizations.q_proj_weight.original", "att.parametrizations.k_proj_weight.original",
            "att.parametrizations.v_proj_weight.original"} <= keys and "att.in_proj_bias" not in keys


# ------------------------------------------------------------------------------------------ Algorithm 3
def test_transformer_encoder_layer_gradients_equal_an_explicit_algorithm_3():
    """dL/dT of the library against autograd through the SCU reference pass and the training forward of an
    nn.TransformerEncoderLayer (post-norm, ReLU, batch_first), both written here with eq. 6."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, FF, dropout=0.0, batch_first=True).to(DT)
    ref, x = torch.randn(5, 4, E, dtype=DT), torch.randn(3, 4, E, dtype=DT)
    lam = 1e-2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tp.TraceFallbackWarning)
        tp.to_target_space(layer, ref, lam=lam, init="random", target_std=0.5)
    sa = layer.self_attn
    tgt = {"in": sa.parametrizations.in_proj_weight.original, "out": sa.out_proj.parametrizations.weight.original,
           "l1": layer.linear1.parametrizations.weight.original, "l2": layer.linear2.parametrizations.weight.original}
    norms = [layer.norm1, layer.norm2]

    def norm(i, z):
        return F.layer_norm(z, (E,), norms[i].weight, norms[i].bias, norms[i].eps)

    def block(z, w, solve=False):
        """The layer on z (N, L, E); with solve, each weight is solved first from the input it gets (SCU)."""
        s = z.transpose(0, 1)
        if solve:
            w["in"] = ridge(rows(s), rows(tgt["in"]), lam)
        q, k, v = (rows(s) @ w["in"][0].T + w["in"][1]).reshape(*s.shape[:2], 3 * E).chunk(3, -1)
        a = rows(attention(q, k, v, H))
        if solve:
            w["out"] = ridge(a, tgt["out"], lam)
        z1 = norm(0, z + (a @ w["out"][0].T + w["out"][1]).reshape(s.shape).transpose(0, 1))
        if solve:
            w["l1"] = ridge(rows(z1), rows(tgt["l1"]), lam)
        h = torch.relu(z1 @ w["l1"][0].T + w["l1"][1])
        if solve:
            w["l2"] = ridge(rows(h), rows(tgt["l2"]), lam)
        return norm(1, z1 + h @ w["l2"][0].T + w["l2"][1])

    def loss(out):
        return (out.sin() * torch.linspace(-1, 1, E, dtype=DT)).sum()

    loss(layer(x)).backward()
    got = {k: t.grad.clone() for k, t in tgt.items()} | {f"norm{i}": norms[i].weight.grad.clone() for i in (0, 1)}
    for p in layer.parameters():
        p.grad = None
    weights = {}
    block(ref, weights, solve=True)  # Algorithm 2, by hand
    loss(block(x, weights)).backward()  # Algorithm 1 with those weights; autograd gives Algorithm 3
    want = {k: t.grad for k, t in tgt.items()} | {f"norm{i}": norms[i].weight.grad for i in (0, 1)}
    for k in want:
        assert close(got[k], want[k], 1e-8), k


# ------------------------------------------------------------------------------------------ transformer layers
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
def test_nn_transformer_converts_every_linear_map(batch_first, norm_first):
    torch.manual_seed(0)
    model = nn.Transformer(E, H, 2, 2, FF, dropout=0.1, batch_first=batch_first, norm_first=norm_first)
    shape = (lambda n, l: (n, l, E)) if batch_first else (lambda n, l: (l, n, E))
    src, tgt = torch.randn(shape(6, 7)), torch.randn(shape(6, 5))
    keys, classes = list(model.state_dict()), [(n, type(m)) for n, m in model.named_modules()]
    model.eval()
    with torch.no_grad():
        y0 = model(src, tgt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tp.TraceFallbackWarning)
        tp.to_target_space(model, (src, tgt), lam=1e-5, lam_mode="relative")
    assert not weight_space_maps(model)
    with torch.no_grad():
        assert close(model(src, tgt), y0, 1e-3)
    model.train()
    start = {n: p.detach().clone() for n, p in targets(model).items()}
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(shape(3, 7)), torch.randn(shape(3, 5))).square().mean().backward()
        opt.step()
    moved = [n for n, p in targets(model).items() if not torch.equal(p.detach(), start[n])]
    assert moved == list(start)
    model.eval()
    probe = torch.randn(shape(2, 7)), torch.randn(shape(2, 5))
    with torch.no_grad():
        y1 = model(*probe)
    tp.to_weight_space(model)
    assert list(model.state_dict()) == keys
    assert [(n, type(m)) for n, m in model.named_modules()] == classes
    with torch.no_grad():
        assert close(model(*probe), y1, 1e-6)


@pytest.mark.parametrize("need_weights", [False, True])
def test_eval_fast_paths_compute_with_the_realised_weights(monkeypatch, need_weights):
    """nn.TransformerEncoderLayer's and nn.MultiheadAttention's fused kernels (used in eval under no_grad) read
    the realised weights, also after a step has changed the targets: their output equals the slow path of a
    weight-space copy."""
    torch.manual_seed(0)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, FF, dropout=0.0, batch_first=True), 2,
                                             enable_nested_tensor=False)
            self.att = nn.MultiheadAttention(E, H, batch_first=True)

        def forward(self, x):
            h = self.enc(x)
            return self.att(h, h, h, need_weights=need_weights)[0]
    model = Model()
    ref = torch.randn(6, 5, E)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tp.TraceFallbackWarning)
        tp.to_target_space(model, ref, lam=1e-3, lam_mode="relative")
    opt = torch.optim.SGD(model.parameters(), 0.1)
    model(torch.randn(3, 5, E)).square().sum().backward()
    opt.step()  # the targets change: the realised weights must follow
    calls = {"layer": 0, "mha": 0}
    for name, key in (("_transformer_encoder_layer_fwd", "layer"), ("_native_multi_head_attention", "mha")):
        fused = getattr(torch, name)

        def spy(*args, fused=fused, key=key, **kwargs):
            calls[key] += 1
            return fused(*args, **kwargs)
        monkeypatch.setattr(torch, name, spy)
    model.eval()
    x = torch.randn(4, 5, E)
    with torch.no_grad():
        y = model(x)
    assert calls == {"layer": 2, "mha": 1}
    plain = tp.to_weight_space(copy.deepcopy(model)).train()  # dropout 0: the slow path, same function
    assert torch.allclose(y, plain(x), atol=1e-5)


def test_state_dict_and_deepcopy_of_a_converted_decoder():
    torch.manual_seed(0)
    model = nn.TransformerDecoder(nn.TransformerDecoderLayer(E, H, FF, batch_first=True), 2)
    x, memory = torch.randn(4, 5, E), torch.randn(4, 6, E)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tp.TraceFallbackWarning)
        tp.to_target_space(model, (x, memory), lam=1e-3)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    model(x[:2], memory[:2]).sum().backward()
    opt.step()
    model.eval()
    probe = torch.randn(2, 5, E), torch.randn(2, 6, E)
    with torch.no_grad():
        y = model(*probe)
    fresh = nn.TransformerDecoder(nn.TransformerDecoderLayer(E, H, FF, batch_first=True), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tp.TraceFallbackWarning)
        tp.to_target_space(fresh, (x, memory), lam=1e-3)
    assert "layers.0.multihead_attn.parametrizations.in_proj_weight.original1" in model.state_dict()
    fresh.load_state_dict(model.state_dict())
    for other in (fresh.eval(), copy.deepcopy(model)):
        with torch.no_grad():
            assert torch.equal(other(*probe), y)


# ------------------------------------------------------------------------------------------ refusals
def test_tied_weights_are_refused_by_parameter_identity():
    torch.manual_seed(0)

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, E)
            self.mix = nn.Linear(E, E)
            self.head = nn.Linear(E, 11, bias=False)
            self.head.weight = self.emb.weight  # tied: the head runs once, the embedding reads it too

        def forward(self, idx):
            return self.head(torch.tanh(self.mix(self.emb(idx))))
    model = GPT()
    ref = torch.randint(0, 11, (6, 4))
    before = model_state(model)
    with pytest.raises(tp.LayerReusedError, match=r"'head'[\s\S]*'emb.weight'[\s\S]*filter_fn"):
        tp.to_target_space(model, ref)
    assert_same_state(before, model_state(model))
    tp.to_target_space(model, ref, filter_fn=lambda m, n: n != "head")
    assert model.head.weight is model.emb.weight and tp.is_target_space(model.mix)

    shared = nn.Sequential(nn.Linear(E, E), nn.Tanh(), nn.Linear(E, E))
    shared[2].weight = shared[0].weight  # one Parameter in two modules, each run once
    with pytest.raises(tp.LayerReusedError, match="'0'"):
        tp.to_target_space(shared, torch.randn(5, E))


def test_other_ops_on_a_converted_weight_are_refused_by_name():
    class MatMul(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(E, E)

        def forward(self, x):
            return x @ self.fc.weight.mT + self.fc(x)
    model = MatMul()
    before = model_state(model)
    with pytest.raises(tp.FunctionalWeightUseError, match=r"'fc'[\s\S]*mT[\s\S]*filter_fn"):
        tp.to_target_space(model, torch.randn(5, E))
    assert_same_state(before, model_state(model))


def test_a_bare_parameter_used_twice_stays_in_weight_space_with_a_warning():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(E, E))
            self.fc = nn.Linear(E, 3)

        def forward(self, x):
            return self.fc(F.linear(torch.tanh(F.linear(x, self.w)), self.w))
    model = Twice()
    with pytest.warns(UserWarning, match=r"w: its rows are used as \[\(0, 8\), \(0, 8\)\]"):
        tp.to_target_space(model, torch.randn(20, E))
    assert "w" in dict(model.named_parameters()) and tp.is_target_space(model.fc)


# ------------------------------------------------------------------------------------------ model zoo
TIMM = [("vit_tiny_patch16_224", dict(img_size=32, depth=2)), ("deit_tiny_patch16_224", dict(img_size=32, depth=2)),
        ("beit_base_patch16_224", dict(img_size=32, depth=2, embed_dim=64, num_heads=2)),
        ("eva02_tiny_patch14_224", dict(img_size=28, depth=2)),
        ("swin_tiny_patch4_window7_224", dict(img_size=56, depths=(1, 1), embed_dim=24, num_heads=(2, 2))),
        ("swinv2_tiny_window8_256", dict(img_size=64, depths=(1, 1), embed_dim=24, num_heads=(2, 2)))]


@pytest.mark.parametrize("name,kw", TIMM, ids=[n for n, _ in TIMM])
def test_timm_transformers_convert_every_linear_map(name, kw):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kw).eval()
    for m in model.modules():  # swinv2 starts its residual post-norms at zero: no gradient would reach the blocks
        if isinstance(m, nn.LayerNorm) and m.weight is not None and not m.weight.any():
            nn.init.ones_(m.weight)
    ref = torch.randn(4, 3, kw["img_size"], kw["img_size"])
    with torch.no_grad():
        y0 = model(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tp.RankDeficientWarning)
        tp.to_target_space(model, ref, lam=1e-6)
    assert not weight_space_maps(model)
    with torch.no_grad():
        assert close(model(ref), y0, 1e-3)
    model.train()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    start = {n: p.detach().clone() for n, p in targets(model).items()}
    F.cross_entropy(model(torch.randn_like(ref)), torch.arange(4)).backward()
    opt.step()
    assert all(not torch.equal(p.detach(), start[n]) for n, p in targets(model).items())


def converted_encoder(**options):
    """A 2-layer nn.TransformerEncoder (no dropout, batch_first) converted on a (6, 5, E) reference batch with
    relative λ; the model and its reference batch."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, FF, dropout=0.0, batch_first=True), 2,
                                enable_nested_tensor=False)
    ref = torch.randn(6, 5, E)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tp.TraceFallbackWarning)
        tp.to_target_space(enc, ref, lam_mode="relative", **options)
    return enc, ref


def test_weights_read_before_their_layer_runs_in_eval_only():
    """nn.TransformerEncoderLayer reads linear1/linear2's weights for its fast-path checks in eval mode only,
    before the layers run. Converted in train mode (no such read seen) with the attention left in weight space,
    an eval forward repeats its reference pass under the functional mode and gives the weight-space result."""
    enc, x = converted_encoder(lam=1e-4, filter_fn=lambda m, n: isinstance(m, nn.Linear) and "self_attn" not in n)
    assert [layer.name for layer in tp.convert.realisers(enc)[0].layers] == [
        "layers.0.linear1", "layers.0.linear2", "layers.1.linear1", "layers.1.linear2"]
    opt = torch.optim.SGD(enc.parameters(), 0.1)
    enc(x[:3]).square().sum().backward()
    opt.step()
    enc.eval()
    with torch.no_grad():
        y = enc(x)
    plain = tp.to_weight_space(copy.deepcopy(enc)).train()
    assert torch.allclose(y, plain(x), atol=1e-5)


def test_everyday_habits_on_a_converted_transformer():
    """Checkpointing, inference_mode, CPU autocast and torch.compile on a converted nn.TransformerEncoder with its
    attention in target space: each against the plain eager converted model."""
    from torch.utils.checkpoint import checkpoint

    model, _ = converted_encoder(lam=1e-3)
    x = torch.randn(3, 5, E)
    twins = [copy.deepcopy(model) for _ in range(3)]
    model(x).square().sum().backward()
    checkpoint(twins[0], x, use_reentrant=False).square().sum().backward()
    for a, b in zip(model.parameters(), twins[0].parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        y = model(x)
    with torch.inference_mode():
        assert torch.equal(model(x), y)
    plain = tp.to_weight_space(copy.deepcopy(model))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        yb, want = model(x), plain(x)  # (float32: the final LayerNorm runs in float32 under autocast)
    # the realised weights cast to bfloat16 are the plain model's: the same bfloat16 computation, bit for bit
    assert yb.dtype == want.dtype and torch.equal(yb, want)
    compiled, eager = torch.compile(twins[1]), twins[2]
    opts = [torch.optim.SGD(m.parameters(), 0.1) for m in (twins[1], eager)]
    for _ in range(2):
        xb = torch.randn(3, 5, E)
        losses = []
        for m, opt in zip((compiled, eager), opts):
            opt.zero_grad()
            loss = m(xb).square().sum()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert math.isclose(*losses, rel_tol=1e-4)


# ------------------------------------------------------------------------------------------ row blocks, any order
class RowBlocks(nn.Module):
    """A bare (6, 5) weight with its bias used in three row blocks, nested (rows 2:6 sliced again) and in the
    given order of use, each block on its own input."""

    def __init__(self, order):
        super().__init__()
        self.pre = nn.Linear(4, 5)
        self.w = nn.Parameter(torch.randn(6, 5) * 0.5)
        self.b = nn.Parameter(torch.randn(6) * 0.1)
        self.order = order

    def forward(self, x):
        h = torch.tanh(self.pre(x))
        rest_w, rest_b = self.w[2:], self.b[2:]
        blocks = [(self.w[:2], self.b[:2]), (rest_w[:2], rest_b[:2]), (rest_w[2:], rest_b[2:])]
        outs = [None] * 3
        for k in self.order:
            outs[k] = F.linear(h * (k + 1) + k, *blocks[k])
        return torch.cat(outs, -1)


@pytest.mark.parametrize("trace", [True, False], ids=["fx", "hooks"])
@pytest.mark.parametrize("order", [(0, 1, 2), (2, 0, 1), (1, 2, 0)])
def test_nested_row_blocks_used_in_any_order_each_solve_eq6(order, trace):
    """Each row block is one unit with its own target, the k-th in *row* order at ``original<k>``, whatever the
    order of use; its rows solve eq. 6 on the input of its own use; the function is kept (init="project")."""
    torch.manual_seed(0)
    model = RowBlocks(order).to(DT)
    ref = torch.randn(40, 4, dtype=DT)
    with torch.no_grad():
        y0 = model(ref)
    lam = 1e-9
    with warnings.catch_warnings():
        warnings.simplefilter("error", tp.TargetSpaceWarning)  # no block may be left in weight space
        tp.to_target_space(model, ref, lam=lam, trace=trace)
    assert [layer.name for r in tp.convert.realisers(model) for layer in r.layers][0] == "pre"
    with torch.no_grad():
        assert close(model(ref), y0, 1e-7)
        h = torch.tanh(F.linear(ref, model.pre.weight, model.pre.bias))
        for k in range(3):
            t = getattr(model.parametrizations.w, "original" + (str(k) if k else ""))
            w, b = ridge(h * (k + 1) + k, t, lam)
            assert close(model.w[2 * k:2 * k + 2], w) and close(model.b[2 * k:2 * k + 2], b), k


def test_a_bias_other_than_at_conversion_is_refused_on_the_hook_path():
    """F.linear(x, fc.weight, bias) where the forward passes another bias after conversion: the solve folded
    fc.bias into eq. 6, so the new bias would be ignored; the reference pass refuses it by name."""

    class Switch(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.other, self.use_other = nn.Linear(E, 3), nn.Parameter(torch.ones(3)), False

        def forward(self, x):
            return F.linear(x, self.fc.weight, self.other if self.use_other else self.fc.bias)
    model = Switch().to(DT)
    ref = torch.randn(20, E, dtype=DT)
    tp.to_target_space(model, ref, trace=False)
    model(ref).sum().backward()
    model.use_other = True
    with pytest.raises(tp.FunctionalWeightUseError, match="'fc'"):
        model(ref).sum().backward()


@pytest.mark.parametrize("trace", [True, False], ids=["fx", "hooks"])
def test_a_conv_weight_used_with_an_external_bias(trace):
    """F.conv2d(x, conv.weight, shift) on a bias-free conv: the target is the output less the shift (broadcast
    over the positions), the kernel solves eq. 6 without a ones row, and the function is kept."""

    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
            self.s1, self.s2 = nn.Parameter(torch.randn(2)), nn.Parameter(torch.randn(1))
            self.head = nn.Linear(3 * 4 * 4, 2)

        def forward(self, x):  # (the bias is computed, as beit's is: not a Parameter of its own)
            shift = torch.cat([self.s1, self.s2])
            return self.head(torch.tanh(F.conv2d(x, self.conv.weight, shift, 1, 1)).flatten(1))
    torch.manual_seed(0)
    model = Shifted().to(DT)
    ref = torch.randn(12, 2, 4, 4, dtype=DT)
    with torch.no_grad():
        y0, t0 = model(ref), F.conv2d(ref, model.conv.weight, None, 1, 1)
    lam = 1e-10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tp.RankDeficientWarning)
        tp.to_target_space(model, ref, lam=lam, trace=trace)
    t = model.conv.parametrizations.weight.original
    assert close(t.reshape(t0.shape), t0, 1e-12)
    with torch.no_grad():
        assert close(model(ref), y0, 1e-8)
        a = rows(F.unfold(ref, 3, padding=1).transpose(1, 2))
        tc = rows(t.reshape(t0.shape).flatten(2).transpose(1, 2))
        want = torch.linalg.solve(a.T @ a + lam * torch.eye(a.shape[1], dtype=DT), a.T @ tc).T
        assert close(model.conv.weight.flatten(1), want)
    model(ref).sum().backward()
    assert model.s1.grad.abs().sum() > 0


def test_bare_weights_used_by_other_ops_are_named_and_lookups_are_not():
    """A 2-D or 3-D Parameter that the forward multiplies by torch.addmm or indexes into a matmul (Mixtral's
    experts) stays in weight space with a warning and a row in explain naming it and the op; an embedding
    table (a lookup) is not a linear map the paper solves, and is not named."""

    class Others(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.w, self.b = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.zeros(3))
            self.experts = nn.Parameter(torch.randn(2, 3, 3))
            self.table = nn.Parameter(torch.randn(5, 4))

        def forward(self, x):
            x = x + F.embedding(torch.zeros(len(x), dtype=torch.long), self.table)
            h = torch.addmm(self.b, torch.tanh(self.fc(x)), self.w)
            return h @ self.experts[0]
    ref = torch.randn(10, 4)
    text = str(tp.explain(Others(), ref))
    assert "w: computed with by torch.addmm" in text and "experts: computed with by Tensor.__getitem__" in text
    with pytest.warns(tp.WeightSpaceWarning) as caught:
        tp.to_target_space(Others(), ref)
    message = "\n".join(str(w.message) for w in caught)
    assert "w: computed with by torch.addmm" in message and "experts:" in message and "table" not in message
