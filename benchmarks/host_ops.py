"""What the host does per training step: dispatched aten ops and host synchronisations, per configuration.

A GPU step is bound by the host when its kernels are small: every dispatched op is a launch (or a view the
host still pays for), and every value read back (``.item()``, ``.tolist()``, ``torch.equal``, ``bool(tensor)``,
LAPACK's info checks) waits for the GPU. Both can be counted on the CPU. ``--gpu-path`` forces the library's
CUDA branches (its device-type sets) so that the count is the one a GPU step would make.

    .venv/bin/python benchmarks/host_ops.py --gpu-path                  # spirals, mlp, cnn, resnet18, transformer
    .venv/bin/python benchmarks/host_ops.py cnn --gpu-path --json out/ops.json
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import warnings
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench  # noqa: E402

VIEWS = {"view", "_unsafe_view", "select", "slice", "expand", "transpose", "permute", "t", "as_strided",
         "unsqueeze", "squeeze", "alias", "detach", "unbind", "split", "chunk", "diagonal", "reshape"}
SYNC_OPS = {"_local_scalar_dense", "equal", "is_nonzero", "_linalg_check_errors"}
SYNC_CALLS = {"tolist", "item", "__bool__", "equal"}  # (.item() dispatches _local_scalar_dense: counted twice)


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.sync_ops, self.in_optimiser = collections.Counter(), collections.Counter(), False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        if name in SYNC_OPS and not self.in_optimiser:
            self.sync_ops[name] += 1
        return func(*args, **(kwargs or {}))


class _Calls(TorchFunctionMode):
    """Host reads called from Python, but for the optimiser's own (Adam's step counts live on the CPU)."""

    def __init__(self, ops: _Ops):
        super().__init__()
        self.calls, self.ops = collections.Counter(), ops

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNC_CALLS and not self.ops.in_optimiser:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


def gpu_path() -> None:
    """The library's CUDA branches on the CPU: no value comparisons, triangular solves instead of LAPACK's
    checked routines, the Gram gathered, no channels_last conversion, no CPU-only triangle packing."""
    from target_param import gram, layers, solver

    solver.SYNC_FREE_DEVICES.add("cpu")
    gram.GATHER_DEVICES.add("cpu")
    layers.CHANNELS_LAST_DEVICES.discard("cpu")
    solver._TRIANGLE_DEVICES.discard("cpu")


def count(name: str, space: str) -> dict:
    config = bench.BY_NAME[name]
    setup = config.build(torch.device("cpu"), torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, step, opt = bench.prepare(setup, space, "train", torch.device("cpu"))
    for b in setup.batches[:2]:
        step(b)  # warm: caches filled, optimiser state made
    ops = _Ops()
    calls = _Calls(ops)
    real_step = opt.step

    def optimiser_step(*args, **kwargs):
        ops.in_optimiser = True
        try:
            return real_step(*args, **kwargs)
        finally:
            ops.in_optimiser = False
    opt.step = optimiser_step
    with calls, ops:
        step(setup.batches[2 % len(setup.batches)])
    total = sum(ops.ops.values())
    views = sum(v for k, v in ops.ops.items() if k in VIEWS)
    kinds = dict(calls.calls) | {f"aten.{k}": v for k, v in ops.sync_ops.items()}
    return {"ops": total, "non_view_ops": total - views, "syncs": sum(kinds.values()), "sync_kinds": kinds,
            "top": ops.ops.most_common(6)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("configs", nargs="*", default=["spirals", "mlp", "cnn", "resnet18", "transformer"])
    p.add_argument("--gpu-path", action="store_true", help="force the library's CUDA branches")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.gpu_path:
        gpu_path()
    out = {}
    print(f"{'config':<12} {'weight ops':>10} {'target ops':>10} {'ratio':>6} {'non-view':>9} {'syncs':>6}  sync kinds")
    for name in args.configs:
        w, t = count(name, "weight"), count(name, "target")
        out[name] = {"weight": w, "target": t}
        print(f"{name:<12} {w['ops']:>10,} {t['ops']:>10,} {t['ops'] / w['ops']:>5.1f}× "
              f"{t['non_view_ops'] / max(w['non_view_ops'], 1):>8.1f}× {t['syncs']:>6}  {t['sync_kinds']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
