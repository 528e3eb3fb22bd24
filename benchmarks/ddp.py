"""Target space under DistributedDataParallel: the reference batch replicated on every rank, or sharded.

    .venv/bin/python benchmarks/ddp.py                          # mlp and cnn at world sizes 1, 2 and 4 (gloo, CPU)
    .venv/bin/python benchmarks/ddp.py --configs cnn --worlds 1,2 --steps 20

For each configuration of ``bench.py`` (mlp: 8 × 128 tanh on 784 inputs, n̄ = 200; cnn: the paper's CIFAR CNN,
n̄ = 100; global minibatch n = 100, split evenly over the ranks) each rank holds three models, stepped
interleaved (the order rotates every step, the same on every rank) with Adam:

- W: weight space under DDP;
- R: target space with the whole reference batch on every rank (``process_group=None``), under DDP, which
  all-reduces the targets' gradients like any replicated parameter;
- S: target space with the reference batch sharded (``process_group=dist.group.WORLD``), under DDP.

Per rank it measures the median step of each, the reference pass alone (``Realiser.realise`` under
``no_grad``: Algorithm 2 with its collectives, interleaved R and S), the targets' bytes, and the collectives
of one S step, and the time of one all-reduce of 1 to 10⁶ floats. The table gives, per world size, the slowest rank's medians and the ratios R/W and S/W. The
processes use gloo on loopback, one thread each: with more ranks than cores they share the cores, and their
times measure contention, not scaling (the table says how many cores there were). JSON goes to
``benchmarks/results/ddp-<machine>-<date>.json``.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402

import target_param as tp  # noqa: E402
from target_param.convert import realisers  # noqa: E402

CONFIGS = {  # model, reference batch, λ, target σ, per-example input
    "mlp": (bench.deep_mlp, lambda n, g: torch.rand(n, 784, generator=g), 200, 1e-3, 1.0),
    "cnn": (bench.PaperCNN, lambda n, g: torch.randn(n, 3, 32, 32, generator=g), 100, 0.1, 0.1),
}
N = 100  # the global minibatch


def _target_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for r in realisers(model) for i in range(len(r.layers))
               for t in r.targets(i).values())


class _Count:
    """Counts calls of torch.distributed.all_reduce (the library's collectives go through it)."""

    def __init__(self):
        self.calls, self.elements, self.inner = 0, 0, dist.all_reduce

    def __call__(self, tensor, *args, **kwargs):
        self.calls += 1
        self.elements += tensor.numel()
        return self.inner(tensor, *args, **kwargs)


def _allreduce_times(sizes=(1, 10_000, 100_000, 1_000_000), reps=15) -> dict:
    """Median seconds of one float32 all-reduce of each size, on this group (the α + β·bytes of the cost
    model in docs/performance.md)."""
    out = {}
    for n in sizes:
        t = torch.ones(n)
        dist.all_reduce(t)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            dist.all_reduce(t)
            times.append(time.perf_counter() - t0)
        out[str(n)] = statistics.median(times)
    return out


def _worker(rank, world, init_file, config, steps, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        make, data, nbar, lam, std = CONFIGS[config]
        g = torch.Generator().manual_seed(0)
        ref = data(nbar, g)
        bounds = [nbar * r // world for r in range(world + 1)]
        batches = [(data(N, g), torch.randint(10, (N,), generator=g)) for _ in range(4)]
        torch.manual_seed(0)
        base = make()
        models = {"W": base, "R": copy.deepcopy(base), "S": copy.deepcopy(base)}
        tp.to_target_space(models["R"], ref, lam=lam, init="random", target_std=std)
        tp.to_target_space(models["S"], ref[bounds[rank]:bounds[rank + 1]], lam=lam, init="random", target_std=std,
                           process_group=dist.group.WORLD)
        ddps = {k: torch.nn.parallel.DistributedDataParallel(m) for k, m in models.items()}
        opts = {k: torch.optim.Adam(d.parameters(), 1e-3) for k, d in ddps.items()}
        lo, hi = N * rank // world, N * (rank + 1) // world

        def step(k, i):
            x, y = batches[i % len(batches)]
            opts[k].zero_grad(set_to_none=True)
            F.cross_entropy(ddps[k](x[lo:hi]), y[lo:hi]).backward()
            opts[k].step()

        for k in ddps:  # warm-up
            step(k, 0)
        times = {k: [] for k in ddps}
        order = list(ddps)
        for i in range(steps):
            for k in order[i % 3:] + order[:i % 3]:
                t0 = time.perf_counter()
                step(k, i)
                times[k].append(time.perf_counter() - t0)
        passes = {k: [] for k in ("R", "S")}
        for i in range(steps):
            for k in (("R", "S") if i % 2 == 0 else ("S", "R")):
                t0 = time.perf_counter()
                with torch.no_grad():
                    realisers(models[k])[0].realise()
                passes[k].append(time.perf_counter() - t0)
        count = _Count()
        dist.all_reduce = count
        try:
            step("S", 0)
        finally:
            dist.all_reduce = count.inner
        row = {k: statistics.median(v) for k, v in times.items()}
        row.update({f"ref_{k}": statistics.median(v) for k, v in passes.items()})
        row.update(target_bytes_R=_target_bytes(models["R"]), target_bytes_S=_target_bytes(models["S"]),
                   collectives_S=count.calls, collective_elements_S=count.elements,
                   layers=len(realisers(models["S"])[0].layers),
                   ratios_R=statistics.median(r / w for r, w in zip(times["R"], times["W"])),
                   ratios_S=statistics.median(s / w for s, w in zip(times["S"], times["W"])))
        row["allreduce"] = _allreduce_times()
        rows = [None] * world
        dist.all_gather_object(rows, row)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(rows, f)
    finally:
        dist.destroy_process_group()


def run(config: str, world: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "rows.json")
        mp.spawn(_worker, args=(world, os.path.join(d, "init"), config, steps, out), nprocs=world)
        with open(out) as f:
            rows = json.load(f)
    slowest = {k: max(r[k] for r in rows) for k in ("W", "R", "S", "ref_R", "ref_S", "ratios_R", "ratios_S")}
    first = rows[0]
    return dict(config=config, world=world, steps=steps, **slowest, allreduce=rows[0]["allreduce"],
                target_bytes_R=first["target_bytes_R"], target_bytes_S=max(r["target_bytes_S"] for r in rows),
                collectives_S=first["collectives_S"], collective_elements_S=first["collective_elements_S"],
                layers=first["layers"], per_rank=rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="mlp,cnn")
    p.add_argument("--worlds", default="1,2,4")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    results = []
    for config in args.configs.split(","):
        for world in (int(w) for w in args.worlds.split(",")):
            r = run(config, world, args.steps)
            results.append(r)
            print(f"{config:4s} world {world}: W {r['W'] * 1e3:7.1f} ms  R {r['R'] * 1e3:7.1f} ms  "
                  f"S {r['S'] * 1e3:7.1f} ms | R/W {r['ratios_R']:.2f}  S/W {r['ratios_S']:.2f} | reference pass "
                  f"R {r['ref_R'] * 1e3:6.1f} ms  S {r['ref_S'] * 1e3:6.1f} ms | targets per rank R "
                  f"{r['target_bytes_R'] / 2**20:6.2f} MiB  S {r['target_bytes_S'] / 2**20:6.2f} MiB | "
                  f"S step: {r['collectives_S']} all-reduces ({r['layers']} layers)", flush=True)
    torch.set_num_threads(1)
    meta = bench.machine_info(torch.device("cpu"))
    doc = dict(date=_dt.datetime.now().isoformat(timespec="seconds"), machine=meta, minibatch=N, results=results)
    out = args.out or str(Path(__file__).resolve().parent / "results" /
                          f"ddp-{bench.machine_tag(meta)}-{_dt.datetime.now():%Y%m%d-%H%M%S}.json")
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main()
