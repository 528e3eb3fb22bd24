"""What two habits cost on a converted model: ``torch.compile`` and activation checkpointing.

    .venv/bin/python benchmarks/habits.py                          # both, CPU, 1 thread
    .venv/bin/python benchmarks/habits.py --only compile --configs mlp --pairs 30
    .venv/bin/python benchmarks/habits.py --only checkpoint

compile: for each configuration of ``bench.py`` four models live in one process: weight space (W) and target space
(T), each eager and ``torch.compile(model)`` with default settings. Each compiled model's first steps are timed
alone: the compile time is the first step's time less the median eager step of its space. Then the four are
stepped interleaved, every order in turn (``bench.interleaved_times``), and the table gives the median step of
each and the medians of the per-pair ratios T/W (eager, compiled) and compiled/eager (each space).

checkpoint: the ``resnet18`` configuration (timm, 64×64, n = 64, n̄ = 32) with and without timm's
``set_grad_checkpointing()``, in each space: the peak memory of a training step (``bench.measure_peak``, the
same accounting as the cost table) and the median step time, stepped interleaved.

Nothing fails on a timing: the script reports. The JSON goes to ``benchmarks/results/habits-<machine>-<date>.json``.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402


def _median_ratio(a: list, b: list) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def compile_row(name: str, args, device) -> dict:
    cfg = bench.BY_NAME[name]
    torch.manual_seed(args.seed)
    setup = cfg.build(device, torch.Generator().manual_seed(args.seed))
    steps, first = {}, {}
    for space in ("weight", "target"):
        model, eager_step, _ = bench.prepare(setup, space, "train", device)
        steps[f"{space}-eager"] = eager_step
        compiled = torch.compile(copy.deepcopy(model))
        step, _ = bench.make_step(compiled, setup.loss, "train")
        times = []
        for i in range(args.compile_steps):  # compilation of the forward, then of the backward, happens here
            t0 = time.perf_counter()
            step(setup.batches[i % len(setup.batches)])
            times.append(time.perf_counter() - t0)
        first[space] = times
        steps[f"{space}-compiled"] = step
    t = bench.interleaved_times(steps, setup.batches, args.warmup, args.pairs, bench.sync_fn(device), args.budget)
    med = {k: statistics.median(v) for k, v in t.items()}
    return {
        "config": name, "pairs": len(t["weight-eager"]), "median_s": med, "times_s": t, "first_steps_s": first,
        "compile_s": {s: first[s][0] - med[f"{s}-eager"] for s in ("weight", "target")},
        "tw_eager": _median_ratio(t["target-eager"], t["weight-eager"]),
        "tw_compiled": _median_ratio(t["target-compiled"], t["weight-compiled"]),
        "target_compiled_over_eager": _median_ratio(t["target-compiled"], t["target-eager"]),
        "weight_compiled_over_eager": _median_ratio(t["weight-compiled"], t["weight-eager"]),
    }


def checkpoint_row(args, device) -> dict:
    cfg = bench.BY_NAME["resnet18"]
    row, steps = {"config": "resnet18"}, {}
    for ck in (False, True):
        torch.manual_seed(args.seed)
        setup = cfg.build(device, torch.Generator().manual_seed(args.seed))
        setup.model.set_grad_checkpointing(ck)
        for space in ("weight", "target"):
            key = f"{space}-{'checkpointed' if ck else 'plain'}"
            row[f"{key}-peak_mb"] = bench.measure_peak(setup, space, "train", device)["peak_bytes"] / 2**20
            steps[key] = bench.prepare(setup, space, "train", device)[1]
    t = bench.interleaved_times(steps, setup.batches, args.warmup, args.ck_pairs, bench.sync_fn(device), args.budget)
    row.update(pairs=len(t["weight-plain"]), median_s={k: statistics.median(v) for k, v in t.items()}, times_s=t)
    for space in ("weight", "target"):
        row[f"{space}_time_checkpointed_over_plain"] = _median_ratio(t[f"{space}-checkpointed"], t[f"{space}-plain"])
        row[f"{space}_memory_checkpointed_over_plain"] = row[f"{space}-checkpointed-peak_mb"] / row[f"{space}-plain-peak_mb"]
    return row


def tables(rows: list) -> str:
    out = []
    comp = [r for r in rows if "tw_compiled" in r]
    if comp:
        out += ["| config | compile time T (W) | T/W eager | T/W compiled | T compiled/eager | W compiled/eager |",
                "|---|---|---|---|---|---|"]
        out += [f"| {r['config']} | {r['compile_s']['target']:.1f} s ({r['compile_s']['weight']:.1f} s) | "
                f"{r['tw_eager']:.2f}× | {r['tw_compiled']:.2f}× | {r['target_compiled_over_eager']:.2f}× | "
                f"{r['weight_compiled_over_eager']:.2f}× |" for r in comp]
    ck = [r for r in rows if "target_time_checkpointed_over_plain" in r]
    if ck:
        out += ["", "| config | space | peak MB plain | peak MB checkpointed | memory ratio | time ratio |",
                "|---|---|---|---|---|---|"]
        for r in ck:
            for s in ("weight", "target"):
                out.append(f"| {r['config']} | {s} | {r[f'{s}-plain-peak_mb']:.0f} | "
                           f"{r[f'{s}-checkpointed-peak_mb']:.0f} | {r[f'{s}_memory_checkpointed_over_plain']:.2f}× | "
                           f"{r[f'{s}_time_checkpointed_over_plain']:.2f}× |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["compile", "checkpoint"], default=None)
    p.add_argument("--configs", default="spirals,mlp,cnn", help="compile: bench.py configurations")
    p.add_argument("--pairs", type=int, default=40, help="compile: interleaved rounds")
    p.add_argument("--ck-pairs", type=int, default=8, help="checkpoint: interleaved rounds")
    p.add_argument("--compile-steps", type=int, default=3, help="compiled steps timed alone before the rounds")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--budget", type=float, default=120.0, help="seconds per configuration's rounds (≥ 5 rounds)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(bench.ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = bench.machine_info(device)
    rows = []
    if args.only in (None, "compile"):
        for name in args.configs.split(","):
            rows.append(compile_row(name, args, device))
            print(tables(rows[-1:]), flush=True)
    if args.only in (None, "checkpoint"):
        rows.append(checkpoint_row(args, device))
        print(tables(rows[-1:]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"habits-{bench.machine_tag(info)}-{_dt.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps({"machine": info, "args": vars(args), "rows": rows}, indent=1, default=str))
    print(tables(rows))
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
