"""Checkpoints and resume, serialisation, DistributedDataParallel (gloo, 2 processes on loopback)."""
import io
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import target_param as tp
from conftest import ShortcutMLP, SmallCNN


def make(seed=0):
    torch.manual_seed(seed)
    m = SmallCNN()
    g = torch.Generator().manual_seed(100 + seed)
    return tp.to_target_space(m, torch.randn(16, 3, 8, 8, generator=g), lam=0.1, init="random", target_std=0.1)


def batches(k, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(12, 3, 8, 8, generator=g), torch.randint(0, 5, (12,), generator=g)) for _ in range(k)]


def train(model, opt, data):
    losses = []
    for x, y in data:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_resume_is_bit_identical():
    data = batches(8)
    torch.manual_seed(5)
    ref_model = make()
    ref_opt = torch.optim.Adam(ref_model.parameters(), 1e-2)
    torch.manual_seed(7)
    full = train(ref_model, ref_opt, data)

    torch.manual_seed(5)
    model = make()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    torch.manual_seed(7)
    first = train(model, opt, data[:4])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()}, buf)
    del model, opt

    buf.seek(0)
    ckpt = torch.load(buf)
    resumed = make(seed=3)  # a different architecture instance and reference batch, then loaded
    resumed.load_state_dict(ckpt["model"])
    ropt = torch.optim.Adam(resumed.parameters(), 1e-2)
    ropt.load_state_dict(ckpt["opt"])
    torch.set_rng_state(ckpt["rng"])
    second = train(resumed, ropt, data[4:])
    assert first + second == full  # bit-identical losses (dropout masks included)


def test_mismatched_checkpoint_names_the_key():
    model = make()
    other = tp.to_target_space(SmallCNN(), torch.randn(20, 3, 8, 8), lam=0.1)
    with pytest.raises(tp.ReferenceBatchError, match="target_space_reference"):
        model.load_state_dict(other.state_dict())


def test_whole_module_pickle_is_refused_with_the_state_dict_recipe():
    model = make()
    with pytest.raises(RuntimeError, match="state_dict"):
        torch.save(model, io.BytesIO())


def test_weight_space_checkpoint_loads_after_to_weight_space():
    torch.manual_seed(0)
    original = SmallCNN()
    ckpt = original.state_dict()
    model = tp.to_target_space(SmallCNN(), torch.randn(16, 3, 8, 8), lam=0.1)
    tp.to_weight_space(model)
    model.load_state_dict(ckpt)
    model.eval(), original.eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), original(x))


# ------------------------------------------------------------------------------------------ DDP
def _ddp_worker(rank, world, path, init_file, steps, accumulate, result):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = tp.to_target_space(ShortcutMLP((4, 8, 8, 3)).double(),
                                   torch.randn(30, 4, dtype=torch.float64), lam=1e-3, init="random")
        ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
        opt = torch.optim.SGD(ddp.parameters(), 0.1)
        g = torch.Generator().manual_seed(1)
        for _ in range(steps):
            x, y = torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)
            xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
            opt.zero_grad()
            if accumulate:
                with ddp.no_sync():
                    F.cross_entropy(ddp(xs[:4]), ys[:4], reduction="sum").div(16 / world).backward()
                F.cross_entropy(ddp(xs[4:]), ys[4:], reduction="sum").div(16 / world).backward()
            else:
                F.cross_entropy(ddp(xs), ys).backward()
            opt.step()
        with torch.no_grad():
            state = {k: v.clone() for k, v in model.state_dict().items()}
            state.update({f"realised.{i}": lin.weight.clone() for i, lin in enumerate(model.layers)})
        torch.save(state, os.path.join(path, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("accumulate", [False, True])
def test_ddp_two_processes_match_single_process(accumulate, tmp_path):
    steps, world = 3, 2
    init_file = tempfile.mktemp(dir=tmp_path)
    mp.spawn(_ddp_worker, args=(world, str(tmp_path), init_file, steps, accumulate, None), nprocs=world)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(world))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # identical targets and realised weights on every rank

    torch.manual_seed(0)
    single = tp.to_target_space(ShortcutMLP((4, 8, 8, 3)).double(), torch.randn(30, 4, dtype=torch.float64),
                                lam=1e-3, init="random")
    opt = torch.optim.SGD(single.parameters(), 0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        F.cross_entropy(single(x), y).backward()
        opt.step()
    for k, v in single.state_dict().items():
        assert torch.allclose(r0[k], v, rtol=1e-10, atol=1e-12), k
    # The realised weights amplify the last bits of the targets by the Gram's condition number (here
    # 2.5e-12 in the targets became 1.8e-9 in a small weight); so the realisation itself is compared
    # from the very same targets: the rank's state loaded into the single-process model.
    single.load_state_dict({k: v for k, v in r0.items() if not k.startswith("realised.")})
    with torch.no_grad():
        for i, lin in enumerate(single.layers):
            torch.testing.assert_close(r0[f"realised.{i}"], lin.weight, rtol=1e-12, atol=0)
