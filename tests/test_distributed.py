"""The reference batch sharded across ranks (``process_group``): gloo on CPU, 2 and 3 processes on loopback.

Parity: every rank's realised weights, target gradients and Adam steps equal those of one process holding
the concatenated reference shards and minibatches (float64), with and without gradient accumulation under
``no_sync``; the errors of a sharded conversion, raised alike on every rank with the model untouched;
checkpoints, ``tp.gather_state_dict`` and ``to_weight_space``.
"""
import copy
import datetime
import os
import tempfile
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import target_param as tp
from target_param import distributed as tpd

from conftest import ShortcutMLP

DT = torch.float64


def _spawn(tmp_path, world, scenario, *args):
    init_file = tempfile.mktemp(dir=tmp_path)
    mp.spawn(_worker, args=(world, init_file, scenario, args), nprocs=world)


def _worker(rank, world, init_file, scenario, args):
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", tp.RankDeficientWarning)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        globals()[scenario](rank, world, *args)
    finally:
        dist.destroy_process_group()


def _bounds(sizes):
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return out


# ------------------------------------------------------------------------------------------ models
class GroupedCNN(nn.Module):
    """Stride 2, padding, groups, a shortcut; BatchNorm (in eval mode for parity)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.c3 = nn.Conv2d(8, 6, 1, bias=False)
        self.fc = nn.Linear(6 * 16, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.c1(x)))
        h = h + torch.tanh(self.c2(h))
        h = F.max_pool2d(self.c3(h), 2)
        return self.fc(h.flatten(1))


def _mlp():
    # input 40 wide: d + 1 = 41 > 30 reference rows, so one process solves the first layer in the dual form
    return ShortcutMLP((40, 12, 12, 3))


def _seq():
    # its first layer's input is the reference shard itself (fixed): solved by projections
    return nn.Sequential(nn.Linear(40, 12), nn.Tanh(), nn.Linear(12, 12), nn.ReLU(inplace=True), nn.Linear(12, 3))


class Encoder(nn.Module):
    """nn.TransformerEncoderLayer (batch_first): its attention's in_proj solved as a functional unit."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.layer(self.embed(x)).mean(1))


def _cnn():
    return GroupedCNN().eval()


def _vit():
    import timm

    return timm.create_model("test_vit", pretrained=False, img_size=16, patch_size=8, num_classes=3,
                             embed_dim=16, depth=1, num_heads=2)


MODELS = {
    "mlp": (_mlp, lambda n, g: torch.randn(n, 40, generator=g, dtype=DT)),
    "seq": (_seq, lambda n, g: torch.randn(n, 40, generator=g, dtype=DT)),
    "encoder": (Encoder, lambda n, g: torch.randn(n, 5, 6, generator=g, dtype=DT)),
    "cnn": (_cnn, lambda n, g: torch.randn(n, 3, 16, 16, generator=g, dtype=DT)),
    "vit": (_vit, lambda n, g: torch.randn(n, 3, 16, 16, generator=g, dtype=DT)),
}


# ------------------------------------------------------------------------------------------ parity
def _converted_pair(rank, world, kind, sizes, lam=0.1, **options):
    """(one process on the concatenated shards, this rank's sharded conversion, this rank's row slice)."""
    make, data = MODELS[kind]
    torch.manual_seed(0)
    model = make().to(DT)
    single = copy.deepcopy(model)
    full = data(sum(sizes), torch.Generator().manual_seed(1))
    lo, hi = _bounds(sizes)[rank:rank + 2]
    tp.to_target_space(single, full, lam=lam, **options)
    tp.to_target_space(model, full[lo:hi], lam=lam, process_group=dist.group.WORLD, **options)
    return single, model, slice(lo, hi), data


def _rows_of(name, full, rows):
    """This rank's part of a one-process target, by the layer's own layout (written out here)."""
    if ".in_proj_weight." in name:  # nn.MultiheadAttention projects (L, n̄, E), sequence first
        return full[:, rows]
    if ".out_proj." in name:  # ... and (L·n̄, E) after attention
        return full.reshape(5, -1, full.shape[-1])[:, rows].reshape(-1, full.shape[-1])
    return full[rows]


def _close(a, b, what, tol=1e-9):
    scale = max(float(b.abs().max()), 1e-12)
    err = float((a - b).abs().max()) / scale
    assert err < tol, f"{what}: relative error {err:.3g}"


def _realised(model):
    return {f"{layer.name}.{n}": t.detach().clone()
            for r in tp.convert.realisers(model) for i, layer in enumerate(r.layers)
            for n, t in r.cache[i].items()}


def scenario_parity(rank, world, kind, sizes, steps, accumulate, options=None):
    single, model, rows, data = _converted_pair(rank, world, kind, sizes, **(options or {}))
    sharded = set(tpd.sharded_names(model))
    assert sharded and all(n.endswith("original") or n == "target_space_reference" for n in sharded)
    for k, w in _realised(single).items():
        _close(_realised(model)[k], w, f"rank {rank} realised {k} at conversion")
    if kind == "seq":  # the fixed first layer is solved by this rank's projection P_r
        assert tp.convert.realisers(model)[0].layers[0].adapter.cache.entry[0] == "shard"
    ddp = nn.parallel.DistributedDataParallel(model)
    opt_s, opt_d = torch.optim.Adam(single.parameters(), 1e-2), torch.optim.Adam(ddp.parameters(), 1e-2)
    g = torch.Generator().manual_seed(2)
    b = 4  # per rank
    for step in range(steps):
        x, y = data(b * world, g), torch.randint(0, 3, (b * world,), generator=g)
        opt_s.zero_grad()
        F.cross_entropy(single(x), y).backward()
        xs, ys = x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b]
        opt_d.zero_grad()
        if accumulate:
            with ddp.no_sync():
                F.cross_entropy(ddp(xs[:1]), ys[:1], reduction="sum").div(b).backward()
            F.cross_entropy(ddp(xs[1:]), ys[1:], reduction="sum").div(b).backward()
        else:
            F.cross_entropy(ddp(xs), ys).backward()
        mine, ref = dict(model.named_parameters()), dict(single.named_parameters())
        for n, p in ref.items():
            if p.grad is None:
                assert mine[n].grad is None, n
                continue
            want = _rows_of(n, p.grad, rows) if n in sharded else p.grad
            _close(mine[n].grad, want, f"rank {rank} step {step} gradient of {n}")
        opt_s.step()
        opt_d.step()
    with torch.no_grad():
        x = data(5, torch.Generator().manual_seed(3))
        _close(model(x), single(x), f"rank {rank} output after {steps} Adam steps", 1e-8)
        for k, w in _realised(single).items():
            _close(_realised(model)[k], w, f"rank {rank} realised {k} after {steps} steps", 1e-8)
        for n, p in single.named_parameters():
            _close(dict(model.named_parameters())[n], _rows_of(n, p, rows) if n in sharded else p, f"rank {rank} {n}",
                   1e-8)


@pytest.mark.parametrize("kind,sizes", [("mlp", (11, 19)), ("mlp", (9, 5, 16)), ("seq", (6, 3, 8)), ("cnn", (3, 5)),
                                        ("cnn", (2, 4, 3)), ("vit", (3, 2))])
def test_parity_with_one_process(kind, sizes, tmp_path):
    _spawn(tmp_path, len(sizes), "scenario_parity", kind, sizes, 5, False)


@pytest.mark.parametrize("kind,sizes,options", [
    ("seq", (6, 5), {"lam_mode": "relative"}),  # λ_j from the Gram of the whole reference batch
    ("mlp", (5, 8), {"cascade": "optimistic"}),  # OCU: the targets pass on (eq. 8)
    ("encoder", (3, 4), {}),  # nn.MultiheadAttention's units, sequence first
])
def test_parity_with_other_options(kind, sizes, options, tmp_path):
    _spawn(tmp_path, len(sizes), "scenario_parity", kind, sizes, 3, False, options)


@pytest.mark.parametrize("kind", ["seq", "cnn"])
def test_parity_with_accumulation_under_no_sync(kind, tmp_path):
    _spawn(tmp_path, 2, "scenario_parity", kind, (7, 5) if kind == "seq" else (3, 4), 3, True)


# ------------------------------------------------------------------------------------------ errors
def _untouched(model, before):
    assert not tp.is_target_space(model)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def _refused(rank, model, shard, match, **options):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(tp.ShardError, match=match) as info:
        tp.to_target_space(model, shard, lam=options.pop("lam", 0.1), process_group=dist.group.WORLD, **options)
    _untouched(model, before)
    return str(info.value)


class DataDependent(nn.Module):
    """Raises in its forward on rank 1's reference shard only (a large mean)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        if x.mean() > 50:
            raise ValueError("this shard cannot be run")
        return self.fc(x)


def scenario_errors(rank, world):
    g = torch.Generator().manual_seed(1)
    shard = torch.randn(6 + rank, 40, generator=g, dtype=DT)

    torch.manual_seed(0)
    model = _mlp().to(DT)
    if rank == 1:
        with torch.no_grad():
            model.layers[1].weight[0, 0] += 1e-3
    text = _refused(rank, model, shard, "identical weights")
    assert "layers.1.weight" in text and "rank 1" in text

    torch.manual_seed(0)
    model = _mlp().to(DT)
    odd = torch.randn(5, 40 if rank == 0 else 39, dtype=DT)
    if rank == 0:
        _refused(rank, model, odd, "every dimension but the first")
    else:  # (its own model cannot run a 39-wide shard: the check comes first, and names the shapes)
        text = _refused(rank, model, odd, "every dimension but the first")
        assert "(5, 39)" in text and "(5, 40)" in text

    text = _refused(rank, model, shard[:0] if rank == 1 else shard, "Rank 1's shard of ref_batch is empty")

    _refused(rank, model, shard, "same options", lam=0.1 if rank == 0 else 0.2)
    _refused(rank, model, shard, "max_positions", max_positions=4)
    _refused(rank, model, shard, "lam=0", lam=0.0)  # 41 rows against 13 columns: the primal Gram is singular

    torch.manual_seed(0)
    rnn = nn.Sequential(nn.RNN(3, 5, batch_first=True)).to(DT)
    text = _refused(rank, rnn, torch.randn(2, 4, 3, dtype=DT), "nn.RNN")
    assert "['0']" in text

    torch.manual_seed(0)
    model = DataDependent().to(DT)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shard = torch.randn(4, 4, dtype=DT) + (100.0 if rank == 1 else 0.0)
    if rank == 1:
        with pytest.raises(tp.ReferenceBatchError, match="cannot be run"):
            tp.to_target_space(model, shard, process_group=dist.group.WORLD)
    else:
        with pytest.raises(tp.ShardError, match="failed on another rank") as info:
            tp.to_target_space(model, shard, process_group=dist.group.WORLD)
        assert "ranks: (1,)" in str(info.value)
    _untouched(model, before)

    # a model that converts on every rank after all these refusals: the group is still in step
    torch.manual_seed(0)
    model = tp.to_target_space(_mlp().to(DT), torch.randn(20, 40, dtype=DT), lam=0.1, process_group=dist.group.WORLD)
    assert tp.is_target_space(model)


def test_errors_are_named_alike_on_every_rank_and_leave_the_model(tmp_path):
    _spawn(tmp_path, 2, "scenario_errors")


def scenario_timeout(rank, world):
    tpd.CHECK_TIMEOUT = datetime.timedelta(seconds=3)
    if rank == 1:
        time.sleep(6)  # never converts
        return
    torch.manual_seed(0)
    model = _mlp().to(DT)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(tp.ShardError, match="did not join"):
        tp.to_target_space(model, torch.randn(4, 40, dtype=DT), lam=0.1, process_group=dist.group.WORLD)
    _untouched(model, before)


def test_a_rank_that_does_not_convert_times_out_by_name(tmp_path):
    _spawn(tmp_path, 2, "scenario_timeout")


# ------------------------------------------------------------------------------------------ state
def _train(ddp, opt, data, rank, world, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = data(2 * world, g), torch.randint(0, 3, (2 * world,), generator=g)
        opt.zero_grad()
        F.cross_entropy(ddp(x[2 * rank:2 * rank + 2]), y[2 * rank:2 * rank + 2]).backward()
        opt.step()


def scenario_state(rank, world, kind, sizes, path):
    single, model, rows, data = _converted_pair(rank, world, kind, sizes)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(ddp.parameters(), 1e-2)
    _train(ddp, opt, data, rank, world, 2, 5)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, os.path.join(path, f"ckpt{rank}.pt"))
    _train(ddp, opt, data, rank, world, 2, 6)
    after = {k: v.clone() for k, v in model.state_dict().items()}

    # resume: a fresh sharded conversion on the same shard, the checkpoint, the same two steps
    torch.manual_seed(0)
    fresh = MODELS[kind][0]().to(DT)
    full = data(sum(sizes), torch.Generator().manual_seed(1))
    tp.to_target_space(fresh, full[rows], lam=0.1, process_group=dist.group.WORLD)
    ckpt = torch.load(os.path.join(path, f"ckpt{rank}.pt"))
    fresh.load_state_dict(ckpt["model"])
    ddp2 = nn.parallel.DistributedDataParallel(fresh)
    opt2 = torch.optim.Adam(ddp2.parameters(), 1e-2)
    opt2.load_state_dict(ckpt["opt"])
    _train(ddp2, opt2, data, rank, world, 2, 6)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, after[k]), f"rank {rank}: {k} differs after resuming"

    # the equivalent single-process model
    state = tp.gather_state_dict(ddp)
    x = data(5, torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(x)
    if rank == 0:
        ref = full.shape[0]
        assert state["target_space_reference"].shape[0] == ref and torch.equal(state["target_space_reference"], full)
        single.load_state_dict(state)
        with torch.no_grad():
            _close(single(x), out, "gathered model's output")
    else:
        assert state is None

    # to_weight_space on every rank: identical plain weights
    tp.to_weight_space(model)
    assert not hasattr(model, "_ddp_params_and_buffers_to_ignore") and not tp.is_target_space(model)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    every = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(every, flat)
    assert all(torch.equal(e, every[0]) for e in every)
    if rank == 0:
        plain = tp.to_weight_space(single)
        for (n, p), q in zip(plain.named_parameters(), model.parameters()):
            _close(q, p, f"plain {n}")


@pytest.mark.parametrize("kind,sizes", [("seq", (4, 7)), ("cnn", (2, 3)), ("encoder", (3, 2))])
def test_checkpoints_gather_and_weight_space(kind, sizes, tmp_path):
    _spawn(tmp_path, 2, "scenario_state", kind, sizes, str(tmp_path))


# ------------------------------------------------------------------------------------------ collectives
@pytest.fixture
def group_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["seq", "mlp", "cnn"])
def test_two_sums_per_converted_layer_and_step(kind, group_of_one, monkeypatch):
    make, data = MODELS[kind]
    torch.manual_seed(0)
    model = tp.to_target_space(make().to(DT), data(12, torch.Generator().manual_seed(1)), lam=0.1,
                               process_group=group_of_one)
    layers = len(tp.convert.realisers(model)[0].layers)
    calls = []
    inner = tpd.Shards.sum_
    monkeypatch.setattr(tpd.Shards, "sum_", lambda self, *t: (calls.append(len(t)), inner(self, *t))[1])
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for step in range(3):  # (the first step fills the fixed first layer's cache)
        calls.clear()
        out = model(data(4, torch.Generator().manual_seed(2)))
        forward = len(calls)
        out.square().mean().backward()
        opt.step()
        opt.zero_grad()
        assert (forward, len(calls) - forward) == (layers, layers), f"step {step}"
    with torch.no_grad():  # a forward without a graph, the weights fresh: no collective
        calls.clear()
        model(data(4, torch.Generator().manual_seed(2)))
        model(data(4, torch.Generator().manual_seed(2)))
    assert len(calls) == layers  # (one realisation after the last step, then none)
