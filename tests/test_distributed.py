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


def _cnn():
    return GroupedCNN().eval()


def _vit():
    import timm

    return timm.create_model("test_vit", pretrained=False, img_size=16, patch_size=8, num_classes=3,
                             embed_dim=16, depth=1, num_heads=2)


MODELS = {
    "mlp": (_mlp, lambda n, g: torch.randn(n, 40, generator=g, dtype=DT)),
    "cnn": (_cnn, lambda n, g: torch.randn(n, 3, 16, 16, generator=g, dtype=DT)),
    "vit": (_vit, lambda n, g: torch.randn(n, 3, 16, 16, generator=g, dtype=DT)),
}


# ------------------------------------------------------------------------------------------ parity
def _converted_pair(rank, world, kind, sizes, lam=0.1):
    """(one process on the concatenated shards, this rank's sharded conversion, this rank's row slice)."""
    make, data = MODELS[kind]
    torch.manual_seed(0)
    model = make().to(DT)
    single = copy.deepcopy(model)
    full = data(sum(sizes), torch.Generator().manual_seed(1))
    lo, hi = _bounds(sizes)[rank:rank + 2]
    tp.to_target_space(single, full, lam=lam)
    tp.to_target_space(model, full[lo:hi], lam=lam, process_group=dist.group.WORLD)
    return single, model, slice(lo, hi), data


def _close(a, b, what, tol=1e-9):
    scale = max(float(b.abs().max()), 1e-12)
    err = float((a - b).abs().max()) / scale
    assert err < tol, f"{what}: relative error {err:.3g}"


def _realised(model):
    return {f"{layer.name}.{n}": t.detach().clone()
            for r in tp.convert.realisers(model) for i, layer in enumerate(r.layers)
            for n, t in r.cache[i].items()}


def scenario_parity(rank, world, kind, sizes, steps, accumulate):
    single, model, rows, data = _converted_pair(rank, world, kind, sizes)
    sharded = set(tpd.sharded_names(model))
    assert sharded and all(n.endswith("original") or n == "target_space_reference" for n in sharded)
    for k, w in _realised(single).items():
        _close(_realised(model)[k], w, f"rank {rank} realised {k} at conversion")
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
            want = p.grad[rows] if n in sharded else p.grad
            _close(mine[n].grad, want, f"rank {rank} step {step} gradient of {n}")
        opt_s.step()
        opt_d.step()
    with torch.no_grad():
        for k, w in _realised(single).items():
            pass
        x = data(5, torch.Generator().manual_seed(3))
        _close(model(x), single(x), f"rank {rank} output after {steps} Adam steps", 1e-8)
        for k, w in _realised(single).items():
            _close(_realised(model)[k], w, f"rank {rank} realised {k} after {steps} steps", 1e-8)
        for n, p in single.named_parameters():
            _close(dict(model.named_parameters())[n], p[rows] if n in sharded else p, f"rank {rank} {n}", 1e-8)


@pytest.mark.parametrize("kind,sizes", [("mlp", (11, 19)), ("mlp", (9, 5, 16)), ("cnn", (3, 5)),
                                        ("cnn", (2, 4, 3)), ("vit", (3, 2))])
def test_parity_with_one_process(kind, sizes, tmp_path):
    _spawn(tmp_path, len(sizes), "scenario_parity", kind, sizes, 5, False)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_parity_with_accumulation_under_no_sync(kind, tmp_path):
    _spawn(tmp_path, 2, "scenario_parity", kind, (7, 5) if kind == "mlp" else (3, 4), 3, True)
