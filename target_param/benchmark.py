"""The cost of target space against weight space, for any model: :func:`benchmark` and its command line,

    python -m target_param.benchmark MODEL --input C,H,W --batch N --ref NREF --steps K \\
        [--device cpu|cuda] [--lam L] [--max-positions P] [--threads T] [--json PATH]

``MODEL`` is ``timm:NAME`` (created with ``pretrained=False``) or ``package.module:callable`` (called with no
arguments). The weight-space model and its target-space twin live in one process and are stepped
interleaved on the same minibatches, the order alternating; a step is ``zero_grad`` + forward + loss +
backward + ``Adam.step`` (CUDA: synchronised around it). Reported: the median step time of each, the median
of the per-pair ratios T/W and their interquartile range, the peak memory of each model measured alone, the
ratio of counted floating-point operations (``torch.utils.flop_counter``: the arithmetic floor of T/W), and
the totals of :func:`~target_param.explain`. ``benchmarks/bench.py`` measures its fixed configurations with
the same functions.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib
import itertools
import json
import math
import os
import statistics
import sys
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from .errors import InvalidArgumentError

__all__ = ["benchmark", "BenchmarkResult", "interleaved_times", "peak_memory", "flops_of", "quantile", "sync_fn",
           "load_model", "main"]


# ------------------------------------------------------------------------------------------ measurement
def sync_fn(device: torch.device) -> Callable[[], None]:
    """``torch.cuda.synchronize`` on CUDA, else a no-op."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def quantile(xs, q: float) -> float:
    """The q-quantile of xs, linearly interpolated (NaN when empty)."""
    xs = sorted(xs)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def interleaved_times(steps: dict, batches: list, warmup: int, pairs: int, sync: Callable[[], None],
                      budget_s: float | None = None, min_pairs: int = 5, progress=None) -> dict[str, list[float]]:
    """Per-step seconds of each model, one step of each per pair, the order cycling through every permutation
    of the models (no model always runs in the middle; in a fixed order the middle one measured 2-4% slower
    against itself). ``progress``: called once per pair."""
    names = list(steps)
    orders = list(itertools.permutations(names))
    for i in range(warmup):
        for name in names:
            steps[name](batches[i % len(batches)])
    sync()
    times = {name: [] for name in names}
    gc.collect()
    gc_was = gc.isenabled()
    gc.disable()
    start = time.perf_counter()
    try:
        for i in range(pairs):
            batch = batches[i % len(batches)]
            for name in orders[i % len(orders)]:
                sync()
                t0 = time.perf_counter()
                steps[name](batch)
                sync()
                times[name].append(time.perf_counter() - t0)
            if progress is not None:
                progress()
            if budget_s and time.perf_counter() - start > budget_s and i + 1 >= min_pairs:
                break
    finally:
        if gc_was:
            gc.enable()
    return times


def persistent_bytes(model: nn.Module, opt) -> int:
    """Bytes of the storages of the parameters, buffers and optimiser state (each storage once)."""
    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    if opt is not None:
        tensors += [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    for t in tensors:
        try:
            key, size = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
        except Exception:
            key, size = id(t), t.numel() * t.element_size()
        if key not in seen:
            seen.add(key)
            total += size
    return total


@contextlib.contextmanager
def quiet_stderr():
    """The profiler's C++ side prints start/stop lines on fd 2; keep them out of the output."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


_MARK = "target_param_measured_step"


def peak_memory(make: Callable[[], tuple], batches: list, device: torch.device) -> dict:
    """Peak memory of one model in isolation, from its creation to the end of a measured step.

    ``make()`` creates the model (a copy, converted if it is the target-space one) and returns
    ``(model, step, optimiser)``; it is warmed up with one step (so that optimiser state and anything kept
    between steps exist), then one more step is measured. The number is the peak, during that step, of
    everything allocated since just before ``make()``: parameters or targets, buffers (the reference batch),
    optimiser state, caches, and the step's activations, saved tensors, gradients and temporaries; the
    minibatch (allocated before) is not counted. CUDA: ``torch.cuda.max_memory_allocated``. CPU:
    ``torch.profiler(profile_memory=True)`` records every allocation and free of the CPU allocator; the
    maximum of their running sum over the measured step is the peak."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        model, step, opt = make()
        step(batches[1 % len(batches)])
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step(batches[0])
        torch.cuda.synchronize()
        peak, method = torch.cuda.max_memory_allocated() - base, "cuda.max_memory_allocated"
    else:
        from torch.profiler import ProfilerActivity, profile, record_function
        with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model, step, opt = make()
            step(batches[1 % len(batches)])
            if opt is not None:
                opt.zero_grad(set_to_none=True)
            with record_function(_MARK):
                step(batches[0])
        events = prof.profiler.kineto_results.events()
        marks = [e.start_ns() for e in events if e.name() == _MARK]
        mark = marks[0] if marks else None
        cur, peak = 0, 0
        for e in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
            cur += e.nbytes()
            if mark is None or e.start_ns() >= mark:
                peak = max(peak, cur)
        method = "torch.profiler(profile_memory) net CPU allocation"
    persistent = persistent_bytes(model, opt)
    del model, step, opt
    gc.collect()
    return {"peak_bytes": int(peak), "persistent_bytes": int(persistent), "method": method}


def flops_of(make: Callable[[], tuple], batches: list) -> tuple[int, dict]:
    """Floating-point operations of one step (``torch.utils.flop_counter``: matrix products and convolutions,
    forward and backward; elementwise work, pooling, LAPACK and the optimiser are not counted), after one
    warm step; and the count per operator."""
    from torch.utils.flop_counter import FlopCounterMode
    _, step, _ = make()
    step(batches[1 % len(batches)])
    counter = FlopCounterMode(display=False)
    with counter:
        step(batches[0])
    by_op = {str(k).removeprefix("aten."): v for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return counter.get_total_flops(), by_op


# ------------------------------------------------------------------------------------------ the user's model
def _inputs(batch) -> tuple:
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def output_loss(out) -> Tensor:
    """The default loss of :func:`benchmark`: the mean square of every floating output (the cost of a
    backward does not depend on which scalar loss starts it)."""
    leaves = [t for t in tree_leaves(out) if isinstance(t, Tensor) and t.is_floating_point()]
    return sum(t.float().square().mean() for t in leaves)


def _stepper(model: nn.Module, loss_fn: Callable, lr: float = 1e-3):
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def step(batch):
        opt.zero_grad(set_to_none=True)
        loss_fn(model(*_inputs(batch))).backward()
        opt.step()
    return step, opt


@dataclass
class BenchmarkResult:
    """What :func:`benchmark` measured. Times in milliseconds (medians), memory in MiB."""

    weight_ms: float
    target_ms: float
    ratio: float  # median of the per-pair ratios T/W
    ratio_iqr: tuple[float, float]
    pairs: int
    weight_peak_mb: float | None = None
    target_peak_mb: float | None = None
    memory_ratio: float | None = None
    flop_ratio: float | None = None
    target_params: int = 0
    weight_params: int = 0
    layers: int = 0
    device: str = "cpu"
    threads: int = 1
    plan: str = ""
    raw: dict = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        def f(v, fmt):
            return "-" if v is None else format(v, fmt)
        head = ("space", "ms/step", "T/W", "IQR", "peak MiB", "mem T/W", "FLOPs T/W", "parameters")
        rows = [("weight", f(self.weight_ms, ".2f"), "", "", f(self.weight_peak_mb, ".1f"), "", "",
                 f"{self.weight_params:,}"),
                ("target", f(self.target_ms, ".2f"), f"{self.ratio:.2f}×",
                 f"{self.ratio_iqr[0]:.2f}-{self.ratio_iqr[1]:.2f}", f(self.target_peak_mb, ".1f"),
                 f(self.memory_ratio, ".2f") + ("×" if self.memory_ratio is not None else ""),
                 f(self.flop_ratio, ".2f") + ("×" if self.flop_ratio is not None else ""), f"{self.target_params:,}")]
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        fmt = "  ".join("{:<%d}" % w for w in widths)
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths)), *(fmt.format(*r) for r in rows)]
        lines.append(f"{self.layers} converted layers; {self.pairs} interleaved pairs on {self.device}, "
                     f"{self.threads} thread(s); T/W: median of per-pair ratios, IQR: their 25th-75th percentile")
        return "\n".join(line.rstrip() for line in lines)


class _Progress:
    """A progress bar on stderr: tqdm when installed, else a counter line."""

    def __init__(self, total: int, enabled: bool):
        self.bar, self.done, self.total, self.enabled = None, 0, total, enabled
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc="interleaved pairs", unit="pair", file=sys.stderr)
            except ImportError:
                pass

    def __call__(self):
        self.done += 1
        if self.bar is not None:
            self.bar.update()
        elif self.enabled:
            print(f"\rinterleaved pairs {self.done}/{self.total}", end="", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.done:
            print(file=sys.stderr)


def benchmark(model: nn.Module, ref_batch, batch, *, loss_fn: Callable | None = None, steps: int = 20,
              warmup: int = 2, memory: bool = True, flops: bool = True, progress: bool = True,
              **convert_options) -> BenchmarkResult:
    """Time, memory and FLOPs of a training step of ``model`` in target space against weight space.

    ``model`` is left as it is: the weight-space model and the target-space one are deep copies, the second
    converted by ``tp.to_target_space(copy, ref_batch, **convert_options)``. Both are stepped ``steps``
    times, interleaved (the order alternating), after ``warmup`` steps each; a step is Adam's ``zero_grad``,
    ``model(*batch)``, ``loss_fn(output).backward()`` and ``step()``. Peak memory is measured for each model
    alone afterwards (see :func:`peak_memory`), and FLOPs by ``torch.utils.flop_counter`` (see
    :func:`flops_of`).

    Args:
        model: any module whose forward accepts ``batch``; on the device the measurement should run on.
        ref_batch: the reference batch X̄ for the conversion (a tensor or a tuple of inputs).
        batch: the minibatch of every step: a tensor or a tuple of positional inputs.
        loss_fn: ``loss_fn(output) -> scalar``; default the mean square of the outputs.
        steps: interleaved pairs measured (at least 2).
        warmup: steps of each model before measuring.
        memory, flops: measure peak memory / count FLOPs (each costs a few more steps).
        progress: a progress bar on stderr.
        **convert_options: passed to ``to_target_space`` (``lam``, ``lam_mode``, ``max_positions``, ...).

    Returns:
        A :class:`BenchmarkResult`; ``print(result)`` shows the table.

    Example:
        >>> import torch, target_param as tp
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
        >>> r = tp.benchmark(net, torch.randn(32, 8), torch.randn(16, 8), steps=3, memory=False,
        ...                  progress=False)
        >>> r.ratio > 0 and r.layers == 2
        True
    """
    from .convert import explain, to_target_space

    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 2:
        raise InvalidArgumentError("steps must be an int ≥ 2 (interleaved pairs measured).", None, steps=steps)
    loss_fn = output_loss if loss_fn is None else loss_fn
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = explain(model, ref_batch, **convert_options)

    def make(space, quiet=True):
        def build():
            m = copy.deepcopy(model)
            if space == "target":
                with warnings.catch_warnings():
                    if quiet:  # (the conversion's warnings once, from the first)
                        warnings.simplefilter("ignore")
                    to_target_space(m, ref_batch, **convert_options)
            step, opt = _stepper(m, loss_fn)
            return m, step, opt
        return build
    wmodel, wstep, _ = make("weight")()
    tmodel, tstep, _ = make("target", quiet=False)()
    bar = _Progress(steps, progress)
    try:
        times = interleaved_times({"weight": wstep, "target": tstep}, [batch], warmup, steps, sync_fn(device),
                                  progress=bar)
    finally:
        bar.close()
    ratios = [t / w for t, w in zip(times["target"], times["weight"])]
    result = BenchmarkResult(
        weight_ms=1e3 * statistics.median(times["weight"]), target_ms=1e3 * statistics.median(times["target"]),
        ratio=statistics.median(ratios), ratio_iqr=(quantile(ratios, 0.25), quantile(ratios, 0.75)),
        pairs=len(ratios), target_params=sum(p.numel() for p in tmodel.parameters()),
        weight_params=sum(p.numel() for p in wmodel.parameters()), layers=len(plan.layers), device=str(device),
        threads=torch.get_num_threads(), plan=str(plan), raw={"weight_s": times["weight"], "target_s": times["target"]})
    del wmodel, tmodel, wstep, tstep
    if memory:
        mw, mt = peak_memory(make("weight"), [batch], device), peak_memory(make("target"), [batch], device)
        result.weight_peak_mb, result.target_peak_mb = mw["peak_bytes"] / 2**20, mt["peak_bytes"] / 2**20
        result.memory_ratio = mt["peak_bytes"] / mw["peak_bytes"] if mw["peak_bytes"] else None
        result.raw.update(weight_mem=mw, target_mem=mt)
    if flops:
        fw, _ = flops_of(make("weight"), [batch])
        ft, by_op = flops_of(make("target"), [batch])
        result.flop_ratio = ft / fw if fw else None
        result.raw.update(weight_flops=fw, target_flops=ft, target_flops_by_op=by_op)
    return result


# ------------------------------------------------------------------------------------------ command line
MODEL_FORMS = "timm:NAME (pretrained=False) or package.module:callable (called with no arguments)"


def load_model(spec: str) -> nn.Module:
    """The model named by ``spec``: ``timm:NAME`` or ``package.module:callable``."""
    kind, sep, name = spec.partition(":")
    if not sep or not kind or not name:
        raise InvalidArgumentError(f"MODEL must be {MODEL_FORMS}.",
                                   "For example timm:resnet18 or torchvision.models:resnet18.", MODEL=spec)
    if kind == "timm":
        try:
            import timm
        except ImportError as e:
            raise InvalidArgumentError("MODEL timm:NAME needs timm installed.", "pip install timm", MODEL=spec) from e
        try:
            return timm.create_model(name, pretrained=False)
        except RuntimeError as e:
            raise InvalidArgumentError(f"timm has no model '{name}'.", "List them with timm.list_models().",
                                       MODEL=spec) from e
    try:
        factory = getattr(importlib.import_module(kind), name)
    except (ImportError, AttributeError) as e:
        raise InvalidArgumentError(f"MODEL must be {MODEL_FORMS}; '{kind}' has no callable '{name}'.",
                                   "Check the module path and the name.", MODEL=spec,
                                   error=f"{type(e).__name__}: {e}") from e
    model = factory()
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"MODEL's callable must return an nn.Module, not {type(model).__name__}.",
                                   None, MODEL=spec)
    return model


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(v < 1 for v in shape):
        raise argparse.ArgumentTypeError(f"--input must be positive integers separated by commas (C,H,W), not {text!r}")
    return shape


def main(argv=None) -> BenchmarkResult:
    """``python -m target_param.benchmark``: see the module docstring."""
    p = argparse.ArgumentParser(prog="python -m target_param.benchmark",
                                description="Cost of a training step in target space against weight space.")
    p.add_argument("model", metavar="MODEL", help=MODEL_FORMS)
    p.add_argument("--input", type=_shape, required=True, help="one pattern's shape, e.g. 3,224,224 or 784")
    p.add_argument("--batch", type=int, default=32, help="minibatch size N (default 32)")
    p.add_argument("--ref", type=int, default=64, help="reference batch size n̄ (default 64)")
    p.add_argument("--steps", type=int, default=20, help="interleaved pairs measured (default 20)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--lam", type=float, default=1e-3, help="λ (default 1e-3)")
    p.add_argument("--lam-mode", default="absolute", choices=["absolute", "relative"])
    p.add_argument("--max-positions", type=int, default=None, help="the approximate option (section 4.2)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--json", default=None, help="also write the result as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    try:
        model = load_model(args.model).to(device)
    except InvalidArgumentError as e:
        p.error(str(e))
    ref = torch.randn(args.ref, *args.input, device=device)
    batch = torch.randn(args.batch, *args.input, device=device)
    result = benchmark(model, ref, batch, steps=args.steps, lam=args.lam, lam_mode=args.lam_mode,
                       max_positions=args.max_positions)
    print(f"{args.model}: input {tuple(args.input)}, N = {args.batch}, n̄ = {args.ref}, λ = {args.lam:g} "
          f"({args.lam_mode})\n")
    print(result)
    lines = result.plan.splitlines()
    totals = next((k for k, line in enumerate(lines) if " layers, planned with " in line), len(lines))
    print("\n" + "\n".join(lines[totals:]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(result.as_dict(), model=args.model, input=list(args.input), batch=args.batch,
                           ref=args.ref, lam=args.lam, lam_mode=args.lam_mode, torch=torch.__version__), f,
                      indent=1)
    return result


class _Module(types.ModuleType):
    """``import target_param.benchmark`` binds the package's ``benchmark`` to this module: calling it is
    calling :func:`benchmark`, so ``tp.benchmark(...)`` works either way."""

    def __call__(self, *args, **kwargs):
        return benchmark(*args, **kwargs)


sys.modules[__name__].__class__ = _Module


if __name__ == "__main__":
    main()
