"""Target space under DistributedDataParallel, with the reference batch sharded across the ranks.

    torchrun --standalone --nproc_per_node 2 examples/ddp.py           # two processes, gloo on the CPU
    torchrun --standalone --nproc_per_node 2 examples/ddp.py --quick   # 40 iterations (the CI smoke test)
    python examples/ddp.py                                             # one process (a group of one)

The two-spirals problem (section 5.1): the 2-5-5-5-2 shortcut net, λ = 1e-3, random targets of σ 1, Adam at
0.01, full batch. Rank r holds the r-th contiguous shard of the 194 training points: it is both this rank's
part of the reference batch X̄ and its minibatch. Every rank realises the same weights, those of one process
holding all 194 points, and each rank's targets are those of its own points (see
``target_param.distributed``). At the end rank 0 gathers the equivalent single-process state_dict, loads it
into a model converted on the whole reference batch, and checks that both compute the same function.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from two_spirals import SPIRAL_RADIUS, TwoSpiralsNet, two_spirals  # noqa: E402

import target_param as tp  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=2000, help="full-batch Adam iterations")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--lam", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--out", type=Path, default=None, help="rank 0 writes summary.json here")
    p.add_argument("--quick", action="store_true", help="40 iterations, for a smoke test")
    args = p.parse_args(argv)
    if args.quick:
        args.iters, args.eval_every = 40, 20
    if "RANK" not in os.environ:  # plain `python examples/ddp.py`: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29512")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        summary = train(args, rank, world)
        dist.barrier()  # no rank tears gloo down while another still works (rank 0 checks the gathered model)
        return summary
    finally:
        dist.destroy_process_group()


def train(args, rank: int, world: int) -> dict:
    data = two_spirals()
    x, y = data["x_train"] / SPIRAL_RADIUS, data["y_train"]
    rows = torch.tensor_split(torch.arange(len(x)), world)[rank]  # this rank's contiguous shard
    x_r, y_r = x[rows], y[rows]

    torch.manual_seed(args.seed)  # the same initial weights on every rank (conversion checks it)
    model = TwoSpiralsNet()
    tp.to_target_space(model, x_r, lam=args.lam, init="random", target_std=1.0, process_group=dist.group.WORLD)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(ddp.parameters(), args.lr)
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"{world} rank(s); rank 0 holds {len(rows)} of {len(x)} reference points; its targets: "
        f"{sum(p.numel() for n, p in model.named_parameters() if n.endswith('original'))} values")

    start, log = time.perf_counter(), []
    for it in range(1, args.iters + 1):
        opt.zero_grad()
        # a mean over this rank's points; DDP averages over the ranks: equal shards give the global mean
        loss = F.cross_entropy(ddp(x_r), y_r)
        loss.backward()
        opt.step()
        if it % args.eval_every == 0 or it == args.iters:
            with torch.no_grad():  # a forward is collective: every rank evaluates its own points
                right = torch.tensor([float((model(x_r).argmax(1) == y_r).sum()), float(loss) * len(rows)])
            dist.all_reduce(right)
            acc, mean_loss = float(right[0]) / len(x), float(right[1]) / len(x)
            log.append({"iteration": it, "train_accuracy": acc, "loss": mean_loss})
            say(f"iteration {it:5d}  loss {mean_loss:.4f}  train accuracy {acc:.3f}")
    seconds = time.perf_counter() - start

    state = tp.gather_state_dict(ddp)  # collective; the whole state on rank 0
    with torch.no_grad():
        test = model(data["x_test"] / SPIRAL_RADIUS)
    summary = None
    if rank == 0:
        torch.manual_seed(args.seed)
        single = tp.to_target_space(TwoSpiralsNet(), x, lam=args.lam, init="random", target_std=1.0)
        single.load_state_dict(state)
        with torch.no_grad():
            gap = float((single(data["x_test"] / SPIRAL_RADIUS) - test).abs().max())
        summary = {"world_size": world, "iterations": args.iters, "seconds": seconds, "log": log,
                   "test_accuracy": float((test.argmax(1) == data["y_test"]).float().mean()),
                   "single_process_gap": gap}
        say(f"test accuracy {summary['test_accuracy']:.3f}; the gathered single-process model differs from the "
            f"sharded one by at most {gap:.1e} on the test points; {seconds:.1f} s")
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
