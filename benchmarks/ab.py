"""One-process A/B of two versions of the library on one benchmark configuration.

    .venv/bin/python benchmarks/ab.py spirals --base HEAD~1 --pairs 400
    .venv/bin/python benchmarks/ab.py cnn-approx --base 32d8665 --pairs 24
    .venv/bin/python benchmarks/ab.py spirals --base WORKTREE      # null A/B: the harness's own bias

The working tree's ``target_param`` ("new") and the one at git revision ``--base`` ("base", extracted with
``git archive`` into a temporary directory and imported under another name) convert the same model, with
the same seed, and are stepped in one process together with the weight-space model, cycling through
every order of the three so that no model always follows another. Reported: the median step time of each,
the median of the per-iteration ratios new/base and their interquartile range, and each library's T/W
(see bench.py for a step). ``--base WORKTREE`` compares the working tree with a copy of itself, which
measures what the harness adds by itself. Nothing fails on a timing: the script only reports.
"""
from __future__ import annotations

import argparse
import importlib
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench  # noqa: E402
import target_param  # noqa: E402


def load_base(revision: str, into: Path):
    """``target_param`` at ``revision`` (or a copy of the working tree's for ``WORKTREE``) as ``tp_base``."""
    target = into / "tp_base"
    if revision == "WORKTREE":
        shutil.copytree(ROOT / "target_param", target, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        archive = subprocess.run(["git", "archive", revision, "target_param"], cwd=ROOT, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
        (into / "target_param").rename(target)
    sys.path.insert(0, str(into))
    return importlib.import_module("tp_base")


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4)
    return q[0], statistics.median(xs), q[2]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", choices=list(bench.BY_NAME))
    p.add_argument("--base", required=True, help="git revision of the base library, or WORKTREE (null A/B)")
    p.add_argument("--pairs", type=int, default=60, help="timed iterations (each steps all three models)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-positions", type=int, default=2048, help="for configurations that need it")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = bench.BY_NAME[args.config]
    if cfg.mode != "train":
        p.error(f"{args.config} is not a training configuration")
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        libs = {"new": target_param, "base": load_base(args.base, Path(tmp))}
        extra = {cfg.needs: args.max_positions} if cfg.needs else {}
        setup = cfg.build(device, torch.Generator().manual_seed(args.seed), **extra)
        steps = {}
        for name, lib in libs.items():
            bench.tp = lib  # the library bench's conversion calls
            torch.manual_seed(args.seed)  # the same random targets (and subset columns)
            steps[name] = bench.prepare(setup, "target", "train", device)[1]
        bench.tp = target_param
        steps["weight"] = bench.prepare(setup, "weight", "train", device)[1]
        times = bench.interleaved_times(steps, setup.batches, args.warmup, args.pairs, bench.sync_fn(device), None)
    ratio = [a / b for a, b in zip(times["new"], times["base"])]
    q1, med, q3 = quartiles(ratio)
    tw = {k: statistics.median(a / w for a, w in zip(times[k], times["weight"])) for k in ("new", "base")}
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"{args.config}: new/base {med:.3f} (IQR {q1:.3f}-{q3:.3f}) over {args.pairs} iterations; "
          f"T/W new {tw['new']:.2f}x, base {tw['base']:.2f}x; median ms: weight {ms['weight']:.3f}, "
          f"new {ms['new']:.3f}, base {ms['base']:.3f} (base: {args.base})")
    return {"ratio": med, "iqr": (q1, q3), "tw": tw, "ms": ms}


if __name__ == "__main__":
    main()
