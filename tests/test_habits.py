"""Everyday PyTorch on a converted model: in-place operations, ``no_grad``/``inference_mode``, ``autocast``,
activation checkpointing, ``torch.compile`` and the training-loop habits (EMA, gradient clipping, lr schedulers,
frozen targets, ``.double()``, ``channels_last``).

Each habit is checked against an independent computation: the same model written out of place, the
un-checkpointed or eager model, the float32 run, an explicit eq. 6 solve in float64, or a step done by hand.
"""
from __future__ import annotations

import copy
import functools
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

import target_param as tp
from target_param import realise as realise_module
from target_param.recompute import Recomputation, in_backward

from conftest import DEVICES

DT = torch.float64


def targets(model) -> dict:
    return {n: p for n, p in model.named_parameters() if n.endswith(".original")}


def convert(model, ref, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tp.RankDeficientWarning)
        kw.setdefault("lam", 1e-3)
        return tp.to_target_space(model, ref, **kw)


def grads_of(model) -> dict:
    return {n: p.grad.clone() for n, p in targets(model).items()}


def assert_close_dicts(a: dict, b: dict, rtol=1e-10, atol=1e-12):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def explicit_weights(model: nn.Sequential, ref: torch.Tensor, lam: float) -> list:
    """Algorithm 2 by hand for a Sequential of Linear layers and activations, float64: per converted layer
    ``[W b] = T Aᵀ(AAᵀ + λI)⁻¹`` on the input the layer really receives (``F.linear`` for the sums)."""
    a, out = ref, []
    for m in model:
        if hasattr(m, "parametrizations"):
            t = m.parametrizations.weight.original.detach()
            x = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)
            wt = torch.linalg.solve(x.T @ x + lam * torch.eye(x.shape[1], dtype=a.dtype), x.T @ t)
            w, b = wt[:-1].T, wt[-1]
            out.append((w, b))
            a = F.linear(a, w, b)
        else:
            a = m(a)
    return out


# ------------------------------------------------------------------------------------------ in place
ACTIVATIONS = {
    "ReLU": nn.ReLU, "ReLU6": nn.ReLU6, "LeakyReLU": functools.partial(nn.LeakyReLU, 0.1), "ELU": nn.ELU,
    "Hardswish": nn.Hardswish, "Hardsigmoid": nn.Hardsigmoid, "SiLU": nn.SiLU, "Mish": nn.Mish,
}


def _twins(act, kind, seed=0):
    """The same network with ``inplace=False`` and with ``inplace=True`` activations after each layer."""
    torch.manual_seed(seed)
    if kind == "linear":
        net = nn.Sequential(nn.Linear(5, 9), act(), nn.Linear(9, 9), act(), nn.Linear(9, 3))
        ref, x = torch.randn(24, 5, dtype=DT), torch.randn(6, 5, dtype=DT)
    else:
        net = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), act(), nn.Conv2d(6, 4, 3, stride=2, groups=2), act(),
                            nn.Flatten(), nn.Linear(4 * 2 * 2, 3))
        ref, x = torch.randn(10, 2, 6, 6, dtype=DT), torch.randn(3, 2, 6, 6, dtype=DT)
    net = net.double()
    inplace = copy.deepcopy(net)
    for m in inplace.modules():
        if hasattr(m, "inplace"):
            m.inplace = True
    return net, inplace, ref, x


@pytest.mark.parametrize("cascade", ["sequential", "optimistic"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_inplace_activations_give_the_out_of_place_values_and_gradients(act, kind, cascade):
    """In-place activations right after converted layers, in the reference pass, the minibatch forward and the
    full-batch forward (X = X̄, one pass): loss and target gradients equal the out-of-place twin's."""
    plain, inplace, ref, x = _twins(ACTIVATIONS[act], kind)
    for m in (plain, inplace):
        convert(m, ref, init="random", cascade=cascade)
    inplace.load_state_dict(plain.state_dict())
    for batch in (x, ref):  # ref: the forward that is the reference pass itself
        results = []
        for m in (plain, inplace):
            m.zero_grad()
            loss = m(batch).pow(2).sum()
            loss.backward()
            results.append((loss.detach(), grads_of(m)))
        torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=0)
        assert_close_dicts(results[0][1], results[1][1])


class InPlaceResidual(nn.Module):
    """``h.relu_()``, ``r += h`` and ``r.mul_(0.5)`` on what converted layers return (or its out-of-place twin)."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.inplace = inplace
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = self.fc1(x)
        h = h.relu_() if self.inplace else h.relu()
        r = self.fc2(h)
        if self.inplace:
            r += h
            r.mul_(0.5)
        else:
            r = (r + h) * 0.5
        return self.fc3(r)


@pytest.mark.parametrize("trace", [True, False])
def test_inplace_method_calls_and_residual_adds(trace):
    torch.manual_seed(1)
    ref, x = torch.randn(20, 4, dtype=DT), torch.randn(5, 4, dtype=DT)
    plain, inplace = InPlaceResidual(False).double(), InPlaceResidual(True).double()
    inplace.load_state_dict(plain.state_dict())
    for m in (plain, inplace):
        convert(m, ref, init="random", trace=trace)
    inplace.load_state_dict(plain.state_dict())
    for batch in (x, ref):
        out = []
        for m in (plain, inplace):
            m.zero_grad()
            m(batch).sum().backward()
            out.append(grads_of(m))
        assert_close_dicts(*out)


def test_inplace_network_passes_gradcheck():
    """Independent of any twin: float64 gradcheck of the in-place network's output in its targets."""
    torch.manual_seed(15)
    net = nn.Sequential(nn.Conv2d(1, 2, 2), nn.LeakyReLU(0.1, inplace=True), nn.Conv2d(2, 2, 2, groups=2),
                        nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(2 * 2 * 2, 2), nn.ELU(inplace=True)).double()
    ref, x = torch.randn(6, 1, 4, 4, dtype=DT), torch.randn(2, 1, 4, 4, dtype=DT)
    convert(net, ref, init="random", lam=0.1)
    keys = list(targets(net))
    ts = [targets(net)[k].detach().clone().requires_grad_() for k in keys]
    assert gradcheck(lambda *t: functional_call(net, dict(zip(keys, t)), (x,)), ts, eps=1e-6, atol=1e-6)


def test_optimistic_cascade_leaves_targets_untouched_by_inplace_activations():
    """OCU passes g(T) on (eq. 8): an in-place ReLU after the layer must not clamp the target itself, and the next
    layer is solved from ReLU(T)."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(inplace=True), nn.Linear(5, 2)).double()
    ref = torch.randn(16, 3, dtype=DT)
    convert(net, ref, init="random", cascade="optimistic", lam=1e-2)
    t0 = net[0].parametrizations.weight.original
    assert (t0 < 0).any()
    before = t0.detach().clone()
    net(torch.randn(4, 3, dtype=DT)).sum().backward()
    assert torch.equal(t0.detach(), before)
    a = torch.cat([before.relu(), torch.ones(16, 1, dtype=DT)], 1)
    t1 = net[2].parametrizations.weight.original.detach()
    wt = torch.linalg.solve(a.T @ a + 1e-2 * torch.eye(6, dtype=DT), a.T @ t1)
    torch.testing.assert_close(net[2].weight, wt[:-1].T)
    torch.testing.assert_close(net[2].bias, wt[-1])


# ------------------------------------------------------------------------------------------ no_grad, inference_mode
def _mlp(seed=3):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    ref = torch.randn(30, 4, dtype=DT)
    return convert(net, ref, init="random", lam=1e-2), ref


MODES = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("mode", list(MODES))
def test_gradient_free_forwards_realise_when_stale_and_leave_training_exact(mode, train):
    """Right after conversion, between steps and after steps, in train and eval mode: a gradient-free forward
    realises exactly when something changed, its weights are eq. 6's (explicit solve), and the training
    steps after it equal those of a twin that never ran it."""
    net, ref = _mlp()
    twin = copy.deepcopy(net)
    x = torch.randn(5, 4, dtype=DT)
    n0 = tp.realisations(net)
    with MODES[mode]():
        net(x)
    assert tp.realisations(net) == n0  # nothing changed since conversion
    net.train(train), twin.train(train)
    with MODES[mode]():
        net(x)
    assert tp.realisations(net) == n0 + (not train)  # a mode switch is a change
    opts = [torch.optim.Adam(m.parameters(), 1e-2) for m in (net, twin)]
    for step in range(3):
        for m, opt in zip((net, twin), opts):
            opt.zero_grad()
            m(x).pow(2).sum().backward()
            opt.step()
        n = tp.realisations(net)
        with MODES[mode]():
            y = net(x)
            y2 = net(x)
        assert tp.realisations(net) == n + 1  # the step changed the targets: one realisation, then reuse
        torch.testing.assert_close(y, y2, rtol=0, atol=0)
        (w1, b1), (w2, b2) = explicit_weights(net, ref, 1e-2)
        torch.testing.assert_close(y, F.linear(torch.tanh(F.linear(x, w1, b1)), w2, b2))
    for a, b in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    net.train(not train)  # a mode switch is a change too
    n = tp.realisations(net)
    with MODES[mode]():
        net(x)
    assert tp.realisations(net) == n + 1


@pytest.mark.parametrize("make", ["ShortcutMLP", "SmallCNN"])
def test_inference_mode_between_steps_on_shortcut_and_conv_models(make):
    """Concatenated shortcuts, BatchNorm, dropout, grouped strided convs: inference-mode forwards between
    steps agree with a twin's no_grad forwards and leave its training exact."""
    import conftest
    torch.manual_seed(16)
    net = getattr(conftest, make)().double()
    shape = (2,) if make == "ShortcutMLP" else (3, 8, 8)
    convert(net, torch.randn(24, *shape, dtype=DT), init="random", lam=1e-2)
    twin = copy.deepcopy(net)
    opts = [torch.optim.SGD(m.parameters(), 1e-2) for m in (net, twin)]
    x = torch.randn(5, *shape, dtype=DT)
    for step in range(2):
        for train in (False, True):
            net.train(train), twin.train(train)
            torch.manual_seed(10 + step)  # (the same dropout draws; BatchNorm's statistics move alike)
            with torch.inference_mode():
                y = net(x)
            torch.manual_seed(10 + step)
            with torch.no_grad():
                torch.testing.assert_close(y, twin(x), rtol=1e-12, atol=1e-12)
        for m, opt in zip((net, twin), opts):
            torch.manual_seed(step)
            opt.zero_grad()
            m(x).pow(2).sum().backward()
            opt.step()
    for a, b in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_weights_realised_under_inference_mode_are_normal_tensors():
    net, _ = _mlp()
    opt = torch.optim.SGD(net.parameters(), 0.1)
    net(torch.randn(3, 4, dtype=DT)).sum().backward()
    opt.step()
    with torch.inference_mode():
        net(torch.randn(2, 4, dtype=DT))
    assert not net[0].weight.is_inference()
    for p in targets(net).values():
        p.requires_grad_(False)
    net(torch.randn(2, 4, dtype=DT, requires_grad=True)).sum().backward()  # reuses them in a graph


def test_buffer_edits_make_gradient_free_forwards_realise_again():
    """The staleness key covers buffers: the reference batch edited in place, and BatchNorm's running statistics
    in eval mode (which the reference pass reads there)."""
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2)).double()
    ref = torch.randn(20, 3, dtype=DT)
    convert(net, ref, init="random")
    net.eval()
    x = torch.randn(4, 3, dtype=DT)
    with torch.no_grad():
        y0 = net(x)
    for edit in (lambda: net.target_space_reference.mul_(2), lambda: net[1].running_mean.add_(0.5),
                 lambda: net[1].running_var.mul_(3)):
        n = tp.realisations(net)
        edit()
        with torch.no_grad():
            y = net(x)
        assert tp.realisations(net) == n + 1
        assert not torch.allclose(y, y0)
        y0 = y
    fresh = copy.deepcopy(net)  # an independent realisation of the same state
    tp.to_weight_space(fresh)
    with torch.no_grad():
        torch.testing.assert_close(net(x), fresh(x))


def test_training_forward_does_not_make_the_weights_stale():
    """BatchNorm's running statistics change at every training forward; the reference pass does not read them in
    train mode, so a weight read after the forward (e.g. by checkpointing's recomputation) realises nothing."""
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2))
    convert(net, torch.randn(20, 3))
    net(torch.randn(4, 3)).sum().backward()
    n = tp.realisations(net)
    with torch.no_grad():  # (a read with grad enabled would realise again: the backward freed the graph)
        net[0].weight, net[3].bias
    assert tp.realisations(net) == n


# ------------------------------------------------------------------------------------------ autocast
def _autocast_pair(kind, seed=6):
    torch.manual_seed(seed)
    if kind == "linear":
        net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(inplace=True), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
        ref, x = torch.randn(64, 6), torch.randn(8, 6)
    else:
        net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3, stride=2),
                            nn.Tanh(), nn.Flatten(), nn.Linear(8 * 3 * 3, 4))
        ref, x = torch.randn(32, 3, 8, 8), torch.randn(4, 3, 8, 8)
    convert(net, ref, init="random", lam=0.1)
    return net, copy.deepcopy(net), ref, x


def _chain_of_plain_gradients(converted, plain) -> list:
    """dL/dT from the weight gradients of ``plain`` (a weight-space copy of ``converted``'s realised weights,
    stepped independently) pushed through ``converted``'s solves (Algorithm 3's backward of Algorithm 2)."""
    names = [n for n, _ in plain.named_parameters()]
    realised = [getattr(converted.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2]) for n in names]
    return torch.autograd.grad(realised, list(targets(converted).values()), [p.grad for p in plain.parameters()])


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_cpu_bfloat16_autocast_solves_in_float32(kind):
    """Under autocast the training forward computes in bfloat16 as a plain model does, and the reference pass
    (the Grams, the solves and the layers between them) in float32: the realised weights are exactly the
    float32 run's; the output is exactly a plain bfloat16 model's with those weights; the target gradients
    are that plain model's weight gradients pushed through the float32 solves."""
    net, fp32, ref, x = _autocast_pair(kind)
    plain = tp.to_weight_space(copy.deepcopy(fp32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, yp = net(x), plain(x)
        realised = [(m.weight, m.bias) for m in net if hasattr(m, "parametrizations")]
    assert y.dtype == yp.dtype == torch.bfloat16
    torch.testing.assert_close(y, yp, rtol=0, atol=0)
    for (w, b), m in zip(realised, [m for m in fp32 if hasattr(m, "parametrizations")]):
        assert w.dtype == torch.float32
        torch.testing.assert_close(w, m.weight, rtol=0, atol=0)
        torch.testing.assert_close(b, m.bias, rtol=0, atol=0)
    y.float().pow(2).mean().backward()
    yp.float().pow(2).mean().backward()
    for g, expected in zip(grads_of(net).values(), _chain_of_plain_gradients(fp32, plain)):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-6)


def test_autocast_training_step_on_the_reference_batch():
    """The full-batch forward (X = X̄, otherwise the reference pass itself) under autocast: a float32 reference
    pass, then the bfloat16 forward, as for any other batch."""
    net, fp32, ref, _ = _autocast_pair("linear")
    plain = tp.to_weight_space(copy.deepcopy(fp32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, yp = net(ref), plain(ref)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, yp, rtol=0, atol=0)
    y.float().pow(2).mean().backward()
    yp.float().pow(2).mean().backward()
    for g, expected in zip(grads_of(net).values(), _chain_of_plain_gradients(fp32, plain)):
        torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [2.0 ** 16, 2.0 ** 4])
def test_autocast_with_grad_scaler(scale, dtype, device, monkeypatch):
    """AMP's recipe, step for step beside a plain model with the same realised weights and its own scaler.
    float16 at GradScaler's default scale 2¹⁶ overflows in the first conv's weight gradient (the plain
    model's too): the target gradients behind it are then non-finite, so the scaler skips the step and halves
    its scale, exactly as for the plain model. Otherwise the unscaled target gradients are the plain model's
    weight gradients pushed through the float32 solves, exactly (cuDNN set deterministic: its default
    kernels differ run to run in the last bits)."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    net, fp32, ref, x = (t.to(device) for t in _autocast_pair("conv"))
    plain = tp.to_weight_space(copy.deepcopy(fp32))
    (scaler, opt), (p_scaler, p_opt) = ((torch.amp.GradScaler(device, init_scale=scale),
                                         torch.optim.Adam(m.parameters(), 1e-3)) for m in (net, plain))
    with torch.autocast(device, dtype=dtype):
        y, yp = net(x), plain(x)
        first = net[0].weight
    assert y.dtype == dtype and first.dtype == torch.float32
    torch.testing.assert_close(first, fp32[0].weight, rtol=1e-6, atol=1e-7)
    scaler.scale(y.float().pow(2).mean()).backward()
    p_scaler.scale(yp.float().pow(2).mean()).backward()
    scaler.unscale_(opt)
    p_scaler.unscale_(p_opt)
    overflow = not all(torch.isfinite(p.grad).all() for p in plain.parameters())
    assert overflow == (dtype == torch.float16 and scale == 2.0 ** 16)  # both paths really taken
    got = list(grads_of(net).values())
    assert all(torch.isfinite(g).all() for g in got) != overflow
    if not overflow:
        for g, expected in zip(got, _chain_of_plain_gradients(fp32, plain)):
            torch.testing.assert_close(g, expected, rtol=1e-6, atol=1e-9)
    before = {n: p.detach().clone() for n, p in targets(net).items()}
    for s_, o in ((scaler, opt), (p_scaler, p_opt)):
        s_.step(o)
        s_.update()
    assert scaler.get_scale() == p_scaler.get_scale() == (scale / 2 if overflow else scale)
    moved = [not torch.equal(before[n], p) for n, p in targets(net).items()]
    assert moved == [not overflow] * len(moved)
    assert all(torch.isfinite(p).all() for p in targets(net).values())


# ------------------------------------------------------------------------------------------ checkpointing
class Block(nn.Module):
    def __init__(self, d, drop):
        super().__init__()
        self.fc, self.act, self.drop = nn.Linear(d, d), nn.ReLU(inplace=True), nn.Dropout(drop)

    def forward(self, x):
        return x + self.drop(self.act(self.fc(x)))


class Checkpointed(nn.Module):
    """A stem, three residual blocks and a head; ``how`` picks how the blocks are checkpointed."""

    def __init__(self, drop=0.0):
        super().__init__()
        self.stem, self.out = nn.Linear(5, 8), nn.Linear(8, 3)
        self.blocks = nn.Sequential(*[Block(8, drop) for _ in range(3)])
        self.how = None

    def forward(self, x):
        x = torch.tanh(self.stem(x))
        if self.how is None:
            x = self.blocks(x)
        elif self.how.startswith("sequential"):
            x = checkpoint_sequential(self.blocks, 2, x, use_reentrant=self.how.endswith("reentrant"))
        else:
            for b in self.blocks:
                x = checkpoint(b, x, use_reentrant=self.how == "reentrant")
        return self.out(x)


CHECKPOINTS = ["non-reentrant", "reentrant", "sequential", "sequential-reentrant"]


def _realisations_in_backward(monkeypatch) -> list:
    """Records, per realisation, whether it ran inside a backward and, if so, inside the end-of-backward
    callback (``Recomputation.flush``) rather than during a recomputation."""
    log, flushing = [], []
    real, flush = realise_module.Realiser.realise, Recomputation.flush

    def spy(self, **kw):
        log.append((in_backward(), bool(flushing)))
        return real(self, **kw)

    def spy_flush(self, realiser):
        flushing.append(1)
        try:
            return flush(self, realiser)
        finally:
            flushing.pop()

    monkeypatch.setattr(realise_module.Realiser, "realise", spy)
    monkeypatch.setattr(Recomputation, "flush", spy_flush)
    return log


@pytest.mark.parametrize("trace", [True, False], ids=["fx", "hooks"])
@pytest.mark.parametrize("drop", [0.0, 0.3])
@pytest.mark.parametrize("how", CHECKPOINTS)
def test_checkpointed_blocks_give_the_unchecked_gradients(how, drop, trace, monkeypatch):
    """Gradients and three Adam steps equal the un-checkpointed model's (float64; dropout in the reference pass
    too), and no realisation runs during recomputation: non-reentrant checkpointing realises nothing in the
    backward; reentrant checkpointing replays the reference pass once, after the backward's recomputations.
    On the hook path the reference pass runs the model's own forward, checkpoint calls included: they run
    plainly there (``recompute.checkpointing_off``)."""
    torch.manual_seed(7)
    ref = torch.randn(40, 5, dtype=DT)
    base = convert(Checkpointed(drop).double(), ref, init="random", trace=trace)
    ck = copy.deepcopy(base)
    ck.how = how
    log = _realisations_in_backward(monkeypatch)
    opts = [torch.optim.Adam(m.parameters(), 1e-2) for m in (base, ck)]
    for step in range(3):
        x = torch.randn(7, 5, dtype=DT)
        grads = []
        for m, opt in zip((base, ck), opts):
            torch.manual_seed(100 + step)
            opt.zero_grad()
            log.clear()
            m(x).pow(2).sum().backward()
            grads.append(grads_of(m))
            opt.step()
        assert_close_dicts(*grads, rtol=1e-8, atol=1e-10)  # (reentrant: two backward passes, other sum order)
        inside = [flushing for backward, flushing in log if backward]
        assert inside == ([True] if "reentrant" in how and not how.startswith("non") else []), log
    for a, b in zip(base.parameters(), ck.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("how", CHECKPOINTS)
def test_checkpointed_blocks_in_full_batch_training(how):
    """X = X̄ (full-batch training): the training forward is the reference pass (fx path), and the blocks'
    checkpoints run plainly inside it, so their recomputation has nothing to repeat; the gradients are the
    unchecked model's."""
    torch.manual_seed(7)
    ref = torch.randn(40, 5, dtype=DT)
    base = convert(Checkpointed().double(), ref, init="random")
    ck = copy.deepcopy(base)
    ck.how = how
    for m in (base, ck):
        m(ref.clone()).pow(2).sum().backward()
    assert tp.realisations(ck) == tp.realisations(base)
    assert_close_dicts(grads_of(base), grads_of(ck), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("how", ["reentrant", "sequential-reentrant"])
def test_reentrant_checkpointing_with_retain_graph_replays_nothing(how, monkeypatch):
    """With ``retain_graph=True`` the realised weights' graph is intact when the backward ends, so the flush
    sends the proxies' gradients through it: no reference pass is replayed, and the gradients are exact."""
    torch.manual_seed(7)
    ref = torch.randn(40, 5, dtype=DT)
    base = convert(Checkpointed(0.3).double(), ref, init="random")
    ck = copy.deepcopy(base)
    ck.how = how
    log = _realisations_in_backward(monkeypatch)
    x = torch.randn(7, 5, dtype=DT)
    grads = []
    for m in (base, ck):
        torch.manual_seed(100)
        log.clear()
        m(x).pow(2).sum().backward(retain_graph=True)
        grads.append(grads_of(m))
        assert [inside for inside, _ in log] == [False]  # the forward's realisation only
    assert_close_dicts(*grads, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("trace", [True, False], ids=["fx", "hooks"])
@pytest.mark.parametrize("drop", [0.0, 0.3])
@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_the_whole_converted_model(reentrant, drop, trace):
    """``checkpoint(model, x)`` gives the un-checkpointed gradients, with dropout too: the reference pass draws
    from the model's own random stream, so the forward's dropout masks are those checkpoint replays. One
    realisation per step; reentrant checkpointing adds the replay of its flush (see recompute)."""
    torch.manual_seed(8)
    ref = torch.randn(30, 5, dtype=DT)
    base = convert(Checkpointed(drop).double(), ref, init="random", trace=trace)
    ck = copy.deepcopy(base)
    opts = [torch.optim.SGD(m.parameters(), 1e-2) for m in (base, ck)]
    for step in range(2):
        x = torch.randn(6, 5, dtype=DT, requires_grad=True)  # (reentrant: a graph out needs a graph in)
        counts = []
        for m, opt in zip((base, ck), opts):
            opt.zero_grad()
            torch.manual_seed(50 + step)
            n = tp.realisations(m)
            (m(x) if m is base else checkpoint(m, x, use_reentrant=reentrant)).pow(2).sum().backward()
            counts.append(tp.realisations(m) - n)
        assert counts == [1, 1 + reentrant]
        assert_close_dicts(grads_of(base), grads_of(ck))
        for opt in opts:
            opt.step()


@pytest.mark.parametrize("reentrant", [False, True])
def test_timm_set_grad_checkpointing(reentrant):
    timm = pytest.importorskip("timm")
    torch.manual_seed(9)
    base = timm.create_model("resnet18", pretrained=False, num_classes=4).double()
    ref = torch.randn(8, 3, 32, 32, dtype=DT)
    convert(base, ref, lam=0.1)
    ck = copy.deepcopy(base)
    ck.set_grad_checkpointing(True)
    if reentrant:  # timm's checkpoint_seq takes use_reentrant; set_grad_checkpointing does not pass it on
        import timm.models._manipulate as manipulate
        ck.forward_features = _reentrant_features(ck, manipulate.checkpoint_seq)
    x = torch.randn(2, 3, 32, 32, dtype=DT)
    base(x).pow(2).sum().backward()
    n = tp.realisations(ck)
    ck(x).pow(2).sum().backward()
    assert tp.realisations(ck) == n + 1 + reentrant
    assert_close_dicts(grads_of(base), grads_of(ck), rtol=1e-9, atol=1e-11)


def _reentrant_features(model, checkpoint_seq):
    def forward_features(x):
        x = model.maxpool(model.act1(model.bn1(model.conv1(x))))
        return checkpoint_seq([model.layer1, model.layer2, model.layer3, model.layer4], x, use_reentrant=True)
    return forward_features


# ------------------------------------------------------------------------------------------ torch.compile
def _compiled_run(make, batches, steps=3):
    """Losses and final targets of eager and compiled copies of one converted model, trained alike."""
    torch._dynamo.reset()
    model = make()
    eager, compiled = model, torch.compile(copy.deepcopy(model))
    losses = {"eager": [], "compiled": []}
    for name, m in (("eager", eager), ("compiled", compiled)):
        opt = torch.optim.SGD(m.parameters(), 0.05, momentum=0.9)  # (Adam would turn float noise in a
        for i in range(steps):                                          # near-zero gradient into a full step)
            x, y = batches[i % len(batches)]
            opt.zero_grad()
            loss = F.cross_entropy(m(x), y)
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    return losses, eager, compiled


def _cnn():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from cnn import TableOneCNN
    torch.manual_seed(10)
    net = TableOneCNN(arch=[(3, 4, 2), (3, 8, 2)], dense=[16]).he_()
    return convert(net, torch.randn(20, 1, 28, 28), lam=0.1, init="random", target_std=0.1)


def _mlp_f32():
    torch.manual_seed(11)
    net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(inplace=True), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 5))
    return convert(net, torch.randn(64, 10), init="random")


def _timm_small():
    timm = pytest.importorskip("timm")
    torch.manual_seed(12)
    return convert(timm.create_model("test_resnet", pretrained=False, num_classes=5), torch.randn(8, 3, 32, 32),
                   lam=0.1)


@pytest.mark.parametrize("make, shape, classes", [(_mlp_f32, (10,), 5), (_cnn, (1, 28, 28), 10),
                                                  (_timm_small, (3, 32, 32), 5)], ids=["mlp", "cnn", "timm"])
def test_torch_compile_trains_like_eager(make, shape, classes):
    """Default torch.compile: the same losses and targets over three SGD steps as eager (float32
    tolerance); the reference pass runs eagerly, the training forward compiled."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, *shape, generator=g), torch.randint(0, classes, (4,), generator=g)) for _ in range(3)]
    losses, eager, compiled = _compiled_run(make, batches)
    assert losses["eager"][0] == pytest.approx(losses["compiled"][0], rel=1e-5)
    assert losses["eager"] == pytest.approx(losses["compiled"], rel=1e-4)
    for (k, a), b in zip(targets(eager).items(), targets(compiled).values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    assert tp.realisations(compiled) == tp.realisations(eager)


def test_torch_compile_full_batch_forward_is_the_reference_pass():
    """A compiled forward on exactly the reference batch (X = X̄) runs as the reference pass, each converted layer
    solved eagerly (graph breaks), and trains like eager."""
    g = torch.Generator().manual_seed(1)
    ref = _mlp_f32().target_space_reference
    batches = [(ref, torch.randint(0, 5, (len(ref),), generator=g))]
    losses, eager, compiled = _compiled_run(_mlp_f32, batches)
    assert losses["eager"] == pytest.approx(losses["compiled"], rel=1e-4)
    for a, b in zip(targets(eager).values(), targets(compiled).values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    realiser = tp.convert.realisers(compiled._orig_mod)[0]
    assert realiser.merges == 3  # every step's forward was the reference pass


def test_fullgraph_compile_is_refused_with_what_to_use():
    model = _mlp_f32()
    torch._dynamo.reset()
    with pytest.raises(Exception, match="(?s)target_param.*fullgraph=True") as info:
        torch.compile(model, fullgraph=True)(torch.randn(2, 10))
    assert not isinstance(info.value, tp.TargetSpaceError) or "torch.compile(model)" in str(info.value)
    model(torch.randn(2, 10)).sum().backward()  # the model still trains eagerly


# ------------------------------------------------------------------------------------------ training-loop habits
def _sgd_twins(seed=13):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    return convert(net, torch.randn(25, 4, dtype=DT), init="random", lam=1e-2)


def test_clip_grad_norm_and_lr_scheduler_step_the_targets_as_written():
    """clip_grad_norm_ and StepLR over the targets: each SGD step equals T − lr_k · g · min(1, c/‖g‖) done by
    hand from the gradients autograd gave."""
    net = _sgd_twins()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x = torch.randn(6, 4, dtype=DT)
    for k in range(3):
        opt.zero_grad()
        net(x).pow(2).sum().backward()
        before = {n: p.detach().clone() for n, p in targets(net).items()}
        raw = {n: p.grad.clone() for n, p in targets(net).items()}
        norm = torch.sqrt(sum(g.pow(2).sum() for g in raw.values()))
        returned = torch.nn.utils.clip_grad_norm_(net.parameters(), 0.1)
        torch.testing.assert_close(returned, norm)
        opt.step()
        sched.step()
        lr = 0.5 * 0.5 ** k
        for n, p in targets(net).items():
            torch.testing.assert_close(p.detach(), before[n] - lr * raw[n] * min(1.0, 0.1 / (norm.item() + 1e-6)))


def test_timm_model_ema_averages_targets_and_realises_from_them():
    timm_utils = pytest.importorskip("timm.utils")
    net = _sgd_twins()
    ema = timm_utils.ModelEmaV3(net, decay=0.9)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    x = torch.randn(6, 4, dtype=DT)
    expected = {n: p.detach().clone() for n, p in targets(net).items()}
    for _ in range(3):
        opt.zero_grad()
        net(x).pow(2).sum().backward()
        opt.step()
        ema.update(net)
        for n, p in targets(net).items():
            expected[n] = 0.9 * expected[n] + 0.1 * p.detach()
    for n, p in targets(ema.module).items():
        torch.testing.assert_close(p, expected[n])
    (w1, b1), (w2, b2) = explicit_weights(ema.module, ema.module.target_space_reference, 1e-2)
    with torch.no_grad():
        torch.testing.assert_close(ema.module(x), F.linear(torch.tanh(F.linear(x, w1, b1)), w2, b2))


def test_frozen_targets_stay_and_their_weights_follow_the_input():
    """A layer's targets frozen (requires_grad False): they get no gradient and do not move, while its weights,
    solved from them on an input that the training changes, do (SCU); the other targets train."""
    net = _sgd_twins()
    frozen = net[2].parametrizations.weight.original
    frozen.requires_grad_(False)
    t0, w0 = frozen.detach().clone(), net[2].weight.detach().clone()
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], 1e-2)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(6, 4, dtype=DT)).pow(2).sum().backward()
        opt.step()
    assert frozen.grad is None and torch.equal(frozen, t0)
    assert not torch.allclose(net[2].weight, w0)
    (_, _), (w2, b2) = explicit_weights(net, net.target_space_reference, 1e-2)
    torch.testing.assert_close(net[2].weight, w2)


def test_double_and_channels_last_after_conversion():
    torch.manual_seed(14)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(inplace=True), nn.Conv2d(4, 3, 3))
    ref = torch.randn(12, 2, 7, 7)
    convert(net, ref, init="random", lam=0.1)
    x = torch.randn(3, 2, 7, 7)
    with torch.no_grad():
        y32 = net(x)
    net.double()
    y64 = net(x.double())
    assert y64.dtype == DT and net[0].weight.dtype == DT
    torch.testing.assert_close(y64.float(), y32, rtol=1e-4, atol=1e-5)
    net.to(memory_format=torch.channels_last)
    y_cl = net(x.double().contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(y_cl, y64)
    y_cl.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in targets(net).values())


@pytest.mark.parametrize("tracer", ["jit.trace", "export"])
def test_tracing_or_exporting_a_converted_model_is_refused_with_the_way_out(tracer):
    model = _mlp_f32()
    x = torch.randn(2, 10)
    trace = (lambda m: torch.jit.trace(m, x)) if tracer == "jit.trace" else (lambda m: torch.export.export(m, (x,)))
    with pytest.raises(tp.UnsupportedHabitError, match="tp.to_weight_space"):
        trace(model)
    with torch.no_grad():
        expected = model(x)
    plain = tp.to_weight_space(model)
    traced = trace(plain)
    out = traced(x) if tracer == "jit.trace" else traced.module()(x)
    torch.testing.assert_close(out, expected)
