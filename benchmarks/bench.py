"""Cost of target space against weight space: time per training step, their ratio, and peak memory.

One command runs every configuration and prints one table (see benchmarks/README.md for the method):

    .venv/bin/python benchmarks/bench.py                       # every configuration, CPU, 1 thread
    .venv/bin/python benchmarks/bench.py --device cuda         # on a GPU
    .venv/bin/python benchmarks/bench.py --configs spirals,cnn --steps 40
    .venv/bin/python benchmarks/bench.py --quick               # a smoke test (seconds per configuration)
    .venv/bin/python benchmarks/bench.py --repeats 3           # each configuration in 3 processes

For each configuration the weight-space model and its target-space twin (``tp.to_target_space(...,
init="random")``) live in ONE process and are stepped INTERLEAVED, one weight-space step and one
target-space step per pair, the order cycling through every permutation, after warm-up. A step is
``zero_grad`` + forward + loss + backward + ``Adam.step`` (CUDA: synchronised before and after). The table
reports the median step time of each model, the median of the per-pair ratios T/W, and the interquartile
range of those ratios. Nothing fails on a timing: the script only reports.

Peak memory is measured afterwards, for each model in isolation (see ``measure_peak``). Raw numbers, the
machine and the library version go to ``<out>/<machine-tag>-<date>.json``.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import hashlib
import inspect
import json
import math
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import target_param as tp  # noqa: E402
from target_param.benchmark import (flops_of, interleaved_times, peak_memory, quantile, quiet_stderr,  # noqa: E402
                                    sync_fn)


# ================================================================================== models and data
class ShortcutMLP(nn.Module):
    """2-5-5-5-2 tanh with all shortcut connections: each layer's input is the concatenation of the network
    input and every earlier hidden output (the paper's two-spirals net, section 5.1)."""

    def __init__(self, sizes=(2, 5, 5, 5, 2)):
        super().__init__()
        self.layers = nn.ModuleList()
        width = sizes[0]
        for out in sizes[1:]:
            self.layers.append(nn.Linear(width, out))
            width += out

    def forward(self, x):
        feats = [x]
        for lin in self.layers[:-1]:
            feats.append(torch.tanh(lin(torch.cat(feats, 1))))
        return self.layers[-1](torch.cat(feats, 1))


def deep_mlp(d_in=784, width=128, depth=8, d_out=10) -> nn.Module:
    mods, w = [], d_in
    for _ in range(depth):
        mods += [nn.Linear(w, width), nn.Tanh()]
        w = width
    mods.append(nn.Linear(w, d_out))
    return nn.Sequential(*mods)


class PaperCNN(nn.Module):
    """CIFAR-10 net of the paper's Table 1: (3-32-1)-(3-32-2)-(3-64-1)-(3-64-2)-(3-128-1)-(3-128-2), dense
    128-10. 3×3 convs, stride 1, same padding, leaky-relu 0.2, max-pool 2 after every second conv."""

    def __init__(self, channels=(32, 32, 64, 64, 128, 128), side=32, hidden=128, classes=10):
        super().__init__()
        self.convs = nn.ModuleList()
        c = 3
        for out in channels:
            self.convs.append(nn.Conv2d(c, out, 3, padding=1))
            c = out
        side //= 2 ** (len(channels) // 2)
        self.fc1 = nn.Linear(c * side * side, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x):
        for i, conv in enumerate(self.convs):
            x = F.leaky_relu(conv(x), 0.2)
            if i % 2 == 1:
                x = F.max_pool2d(x, 2)
        return self.fc2(F.leaky_relu(self.fc1(x.flatten(1)), 0.2))


class BitsRNN(nn.Module):
    """1-23-2 tanh RNN (bit-stream memorisation with N = 20, section 5.3): an output at every time step."""

    def __init__(self, d_in=1, hidden=23, d_out=2):
        super().__init__()
        self.rnn = nn.RNN(d_in, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, d_out)

    def forward(self, x):
        h, _ = self.rnn(x)
        return self.fc(h)


class ImdbRNN(nn.Module):
    """Embedding(5000, 32) → 32-100 tanh RNN → Linear 100-2 on the last state (section 5.4)."""

    def __init__(self, vocab=5000, emb=32, hidden=100, classes=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        nn.init.normal_(self.emb.weight, 0.0, 0.1)
        self.rnn = nn.RNN(emb, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, tokens):
        h, _ = self.rnn(self.emb(tokens))
        return self.fc(h[:, -1])


def two_spirals() -> tuple[torch.Tensor, torch.Tensor]:
    """Lang & Witbrock's 194 points (as examples/two_spirals.py), divided by 6.5 into [-1, 1]²."""
    i = torch.arange(97, dtype=torch.float32)
    theta, radius = i * math.pi / 16, 6.5 * (104 - i) / 104
    p = torch.stack([radius * torch.sin(theta), radius * torch.cos(theta)], 1)
    x = torch.stack([p, -p], 1).reshape(-1, 2) / 6.5
    y = torch.tensor([0, 1]).repeat(97)
    return x, y


def ce(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


@dataclass
class Setup:
    """What a configuration needs: a weight-space model, a function converting a copy of it in place, a
    few minibatches (cycled), the loss, and ``reference(model)``: the model's output on the reference batch,
    where the target space takes it (for the physical floor, see ``make_step``)."""
    model: nn.Module
    convert: Callable[[nn.Module], None]
    batches: list
    loss: Callable = ce
    notes: str = ""
    reference: Callable[[nn.Module], torch.Tensor] | None = None


def _convert(ref, lam, std, **extra):
    def convert(model):
        tp.to_target_space(model, ref, lam=lam, init="random", target_std=std, **extra)
    return convert


def build_spirals(dev, g):
    x, y = two_spirals()
    x, y = x.to(dev), y.to(dev)
    return Setup(ShortcutMLP().to(dev), _convert(x, 1e-3, 1.0), [(x, y)], reference=lambda m: m(x),
                 notes="full batch: the minibatch is the reference batch (n = n̄ = 194)")


def build_mlp(dev, g):
    ref = torch.rand(200, 784, generator=g).to(dev)
    batches = [(torch.rand(100, 784, generator=g).to(dev), torch.randint(10, (100,), generator=g).to(dev))
               for _ in range(4)]
    return Setup(deep_mlp().to(dev), _convert(ref, 1e-3, 1.0), batches, reference=lambda m: m(ref))


def _cnn_batches(dev, g, n=100, count=4):
    return [(torch.randn(n, 3, 32, 32, generator=g).to(dev), torch.randint(10, (n,), generator=g).to(dev))
            for _ in range(count)]


def build_cnn(dev, g, **extra):
    ref = torch.randn(100, 3, 32, 32, generator=g).to(dev)
    return Setup(PaperCNN().to(dev), _convert(ref, 0.1, 0.1, **extra), _cnn_batches(dev, g), reference=lambda m: m(ref))


def build_resnet18(dev, g):
    import timm
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).to(dev)
    ref = torch.randn(32, 3, 64, 64, generator=g).to(dev)
    batches = [(torch.randn(64, 3, 64, 64, generator=g).to(dev), torch.randint(10, (64,), generator=g).to(dev))
               for _ in range(4)]
    return Setup(model, _convert(ref, 0.1, 0.1), batches, reference=lambda m: m(ref))


def build_rnn_bits(dev, g):
    ref = torch.randint(2, (100, 70, 1), generator=g).float().to(dev)
    batches = [(torch.randint(2, (100, 70, 1), generator=g).float().to(dev),
                torch.randint(2, (100, 70), generator=g).to(dev)) for _ in range(4)]
    return Setup(BitsRNN().to(dev), _convert(ref, 0.1, 1.0), batches, reference=lambda m: m(ref),
                 notes="RNN and exit layer both converted; loss at every time step")


def build_rnn_imdb(dev, g):
    ref_seq = (torch.rand(40, 60, 32, generator=g) * 2 - 1).to(dev)  # fixed uniform[-1,1] 'embedded words'

    def convert(model):
        tp.to_target_space(model.rnn, ref_seq, lam=1e-3, init="random", target_std=1.0)

    batches = [(torch.randint(5000, (40, 500), generator=g).to(dev), torch.randint(2, (40,), generator=g).to(dev))
               for _ in range(4)]
    return Setup(ImdbRNN().to(dev), convert, batches, reference=lambda m: m.rnn(ref_seq)[0],
                 notes="only model.rnn converted (reference: 40 fixed uniform[-1,1] sequences of length 60, "
                       "fed straight into the RNN); embedding and exit layer stay in weight space")


class TokenTransformer(nn.Module):
    """A 4-layer nn.TransformerEncoder (d = 64, 4 heads, feed-forward 128, post-norm) on token sequences:
    embedding, positional embedding, mean pooling, linear head."""

    def __init__(self, vocab=1000, length=32, d=64):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(1, length, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, 4, 128, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.head = nn.Linear(d, 10)

    def forward(self, idx):
        return self.head(self.encoder(self.embed(idx) + self.pos).mean(1))


def build_transformer(dev, g):
    ref = torch.randint(1000, (80, 32), generator=g).to(dev)  # n̄ = 80: the head's 65 rows are full rank
    batches = [(torch.randint(1000, (64, 32), generator=g).to(dev), torch.randint(10, (64,), generator=g).to(dev))
               for _ in range(4)]

    def convert(model):
        tp.to_target_space(model, ref, lam=1e-3, lam_mode="relative")
    return Setup(TokenTransformer().to(dev), convert, batches, reference=lambda m: m(ref),
                 notes="every linear map converted: the attention projections (nn.MultiheadAttention's "
                       "in_proj_weight and out_proj, solved at their F.linear calls), linear1/2, the head; "
                       "init='project', relative λ")


# ================================================================================== configurations
@dataclass
class Config:
    name: str
    build: Callable
    n: int
    nbar: str
    lam: float
    steps_cpu: int
    steps_cuda: int = 200
    warmup_cpu: int = 3
    mode: str = "train"  # "train" (fwd+bwd+Adam) or "eval" (no_grad eval forward after realisation)
    paper: str = ""
    goal: float | None = None
    mem_goal: float | None = None
    needs: str | None = None  # a keyword argument of to_target_space this row needs
    extra: dict = field(default_factory=dict)


CONFIGS = [
    Config("spirals", build_spirals, 194, "194", 1e-3, 400, 500, paper="3.5×", goal=2.0),
    Config("mlp", build_mlp, 100, "200", 1e-3, 200, 500, paper="(theory 8×)", goal=4.0),
    Config("cnn", build_cnn, 100, "100", 0.1, 12, 200, warmup_cpu=1, paper="≈7×", goal=3.0, mem_goal=3.0),
    Config("cnn-eval", build_cnn, 100, "100", 0.1, 30, 300, warmup_cpu=2, mode="eval", goal=1.05),
    Config("cnn-approx", build_cnn, 100, "100", 0.1, 12, 200, warmup_cpu=1, needs="max_positions"),
    Config("resnet18", build_resnet18, 64, "32", 0.1, 6, 100, warmup_cpu=1, goal=4.0),
    Config("rnn-bits", build_rnn_bits, 100, "100", 0.1, 60, 300),
    Config("rnn-imdb", build_rnn_imdb, 40, "40×60", 1e-3, 30, 200, paper="1.27×", goal=1.3),
    Config("transformer", build_transformer, 64, "80", 1e-3, 40, 300),
]
BY_NAME = {c.name: c for c in CONFIGS}


# ================================================================================== stepping
def make_step(model, loss_fn, mode, reference=None):
    """A closure doing one timed unit of work on a batch, and the optimiser (None in eval mode).

    With ``reference`` (the *physical floor* of the issue): a weight-space step that also forwards and
    backpropagates the reference batch, i.e. what any method that re-derives the weights from the reference
    batch at every step must at least do."""
    if mode == "eval":
        def step(batch):
            with torch.no_grad():
                model(batch[0])
        return step, None
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(batch):
        opt.zero_grad(set_to_none=True)
        x, y = batch
        loss = loss_fn(model(x), y)
        if reference is not None:
            loss = loss + reference(model).float().mean()
        loss.backward()
        opt.step()
    return step, opt


def prepare(setup: Setup, space: str, mode: str, device):
    """A fresh (deep-copied) model of one space ("weight", "target" or "floor": weight space that also
    forwards and backpropagates the reference batch), ready to be stepped: converted, with its optimiser; an
    eval-mode model is trained 2 steps, switched to eval and realised once (its first no_grad forward)."""
    model = copy.deepcopy(setup.model)
    if space == "target":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            setup.convert(model)
        setup._warnings = sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0]}" for w in caught})
    if mode == "eval":
        train_step, _ = make_step(model, setup.loss, "train")
        for b in setup.batches[:2]:
            train_step(b)
        model.eval()
        step, opt = make_step(model, setup.loss, "eval")
        step(setup.batches[0])  # the realisation the eval forwards reuse
    else:
        step, opt = make_step(model, setup.loss, mode, setup.reference if space == "floor" else None)
    return model, step, opt


# ================================================================================== memory
def measure_peak(setup: Setup, space: str, mode: str, device) -> dict:
    """Peak memory of one model in isolation, from its creation to the end of a measured step
    (``target_param.benchmark.peak_memory``: the model is deep-copied and converted, warmed up with one step,
    then one more step is measured)."""
    return peak_memory(lambda: prepare(setup, space, mode, device), setup.batches, device)


# ================================================================================== one configuration
def run_config(cfg: Config, args, device) -> dict:
    row = {"config": cfg.name, "mode": cfg.mode, "n": cfg.n, "nbar": cfg.nbar, "lam": cfg.lam,
           "paper": cfg.paper, "goal_ratio": cfg.goal, "goal_mem_ratio": cfg.mem_goal}
    kwargs = {}
    if cfg.needs:
        if cfg.needs not in inspect.signature(tp.to_target_space).parameters:
            row["status"] = f"n/a (to_target_space has no '{cfg.needs}' argument)"
            return row
        kwargs[cfg.needs] = args.max_positions
        row[cfg.needs] = args.max_positions
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    setup = cfg.build(device, g, **kwargs)
    row["notes"] = setup.notes
    pairs = args.steps or (cfg.steps_cuda if device.type == "cuda" else cfg.steps_cpu)
    warmup = args.warmup if args.warmup is not None else (10 if device.type == "cuda" else cfg.warmup_cpu)
    if args.quick:
        pairs, warmup = min(pairs, 4), min(warmup, 1)
    t_setup = time.perf_counter()
    wmodel, wstep, _ = prepare(setup, "weight", cfg.mode, device)
    tmodel, tstep, _ = prepare(setup, "target", cfg.mode, device)
    row["conversion_warnings"] = getattr(setup, "_warnings", [])
    row["target_params"] = sum(p.numel() for p in tmodel.parameters())
    row["weight_params"] = sum(p.numel() for p in wmodel.parameters())
    steps = {"weight": wstep, "target": tstep}
    if not args.no_floor and cfg.mode == "train" and setup.reference is not None:
        steps["floor"] = prepare(setup, "floor", cfg.mode, device)[1]
    times = interleaved_times(steps, setup.batches, warmup, pairs, sync_fn(device),
                              None if args.quick else args.budget)
    tw, tt = times["weight"], times["target"]
    if "floor" in times:
        floor = [f / w for f, w in zip(times["floor"], tw)]
        row.update(floor_s=times["floor"], floor_median_s=statistics.median(times["floor"]),
                   floor_ratio=statistics.median(floor),
                   target_over_floor=statistics.median([t / f for t, f in zip(tt, times["floor"])]))
    ratios = [t / w for t, w in zip(tt, tw)]
    blocks = [ratios[i::5] for i in range(5)] if len(ratios) >= 10 else []
    row.update(
        status="ok", pairs=len(tw), warmup=warmup,
        weight_s=tw, target_s=tt, pair_ratios=ratios,
        weight_median_s=statistics.median(tw), target_median_s=statistics.median(tt),
        ratio=statistics.median(ratios), ratio_p25=quantile(ratios, 0.25), ratio_p75=quantile(ratios, 0.75),
        ratio_of_medians=statistics.median(tt) / statistics.median(tw),
        # the pairs dealt round-robin into 5 interleaved blocks: median ratio per block
        block_ratios=[statistics.median(b) for b in blocks],
        realisations=tp.realisations(tmodel) if hasattr(tp, "realisations") else None,
    )
    del wmodel, tmodel, wstep, tstep
    if not args.no_memory:
        mw = measure_peak(setup, "weight", cfg.mode, device)
        mt = measure_peak(setup, "target", cfg.mode, device)
        row.update(weight_mem=mw, target_mem=mt,
                   weight_peak_mb=mw["peak_bytes"] / 2**20, target_peak_mb=mt["peak_bytes"] / 2**20,
                   mem_ratio=mt["peak_bytes"] / mw["peak_bytes"] if mw["peak_bytes"] else float("nan"))
    if not args.no_flops:
        flops = count_flops(setup, cfg.mode, device)
        row.update(flops=flops, flop_ratio=flops["target"] / flops["weight"] if flops["weight"] else None,
                   floor_flop_ratio=flops["floor"] / flops["weight"] if flops.get("floor") and flops["weight"]
                   else None)
    if cfg.name in args.profile:
        row["profile"] = profile_target_step(setup, cfg.mode, device, args.profile_rows)
    row["wall_s"] = time.perf_counter() - t_setup
    return row


def repeat_in_fresh_processes(row: dict, args) -> None:
    """Measure ``row``'s configuration ``args.repeats - 1`` more times, each in a fresh process with the same
    settings (no memory, no profile), and add every process's median ratio to the row:
    ``process_ratios`` (this process first), their median ``ratio_processes`` and ``process_floor_ratios``."""
    import tempfile

    ratios, floors = [row["ratio"]], [row.get("floor_ratio")]
    for _ in range(args.repeats - 1):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--configs", row["config"], "--no-memory", "--no-flops",
                   "--out", tmp, "--threads", str(args.threads), "--device", args.device, "--budget",
                   str(args.budget), "--max-positions", str(args.max_positions), "--seed", str(args.seed)]
            cmd += [flag for flag, on in (("--quick", args.quick), ("--no-floor", args.no_floor)) if on]
            cmd += [x for opt, v in (("--steps", args.steps), ("--warmup", args.warmup)) if v is not None
                    for x in (opt, str(v))]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            files = list(Path(tmp).glob("*.json"))
            if proc.returncode or len(files) != 1:
                row.setdefault("repeat_errors", []).append((proc.stdout + proc.stderr)[-2000:])
                continue
            other = json.loads(files[0].read_text())["rows"][0]
        if other.get("status") == "ok":
            ratios.append(other["ratio"])
            floors.append(other.get("floor_ratio"))
    row.update(process_ratios=ratios, ratio_processes=statistics.median(ratios), process_floor_ratios=floors)


def count_flops(setup: Setup, mode: str, device) -> dict:
    """Floating-point operations of one step of each model (``target_param.benchmark.flops_of``), and the
    target step's count per operator. Machine-independent: the arithmetic ratio T/W bounds the time ratio from
    below when every kernel runs at the same speed in both spaces."""
    out = {}
    for space in ("weight", "target") + (("floor",) if mode == "train" and setup.reference is not None else ()):
        out[space], by_op = flops_of(lambda: prepare(setup, space, mode, device), setup.batches)
        if space == "target":
            out["target_by_op"] = by_op
    return out


def profile_target_step(setup: Setup, mode: str, device, rows: int) -> str:
    """torch.profiler table (top ops by self time) of one target-space step, after one warm step."""
    from torch.profiler import ProfilerActivity, profile
    model, step, _ = prepare(setup, "target", mode, device)
    step(setup.batches[1 % len(setup.batches)])
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with quiet_stderr(), profile(activities=acts) as prof:
        step(setup.batches[0])
        sync_fn(device)()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=48)


# ================================================================================== machine, output
def machine_info(device) -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "hostname": socket.gethostname(), "cpu_model": cpu, "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(), "torch_version": torch.__version__,
        "python": platform.python_version(), "platform": platform.platform(), "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "target_param_version": getattr(tp, "__version__", None),
    }
    src = sorted(Path(tp.__file__).parent.glob("*.py"))
    info["target_param_sha256"] = hashlib.sha256(b"".join(p.read_bytes() for p in src)).hexdigest()[:16]
    try:
        info["git_head"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                          text=True, timeout=10).stdout.strip()
        info["git_dirty_target_param"] = bool(subprocess.run(
            ["git", "status", "--porcelain", "target_param"], cwd=ROOT, capture_output=True, text=True,
            timeout=10).stdout.strip())
    except Exception:
        pass
    return info


def machine_tag(info) -> str:
    name = info["gpu"] if info["gpu"] else info["cpu_model"]
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:32] or "unknown"
    return f"{'cuda' if info['gpu'] else 'cpu'}-{slug}-t{info['torch_num_threads']}"


def _fmt(x, spec, empty="—"):
    return empty if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _processes(r) -> str:
    """``median× [min–max]`` of the per-process ratios (``--repeats``), else empty."""
    xs = r.get("process_ratios")
    return f"{statistics.median(xs):.2f}× [{min(xs):.2f}–{max(xs):.2f}]" if xs and len(xs) > 1 else ""


def table(rows) -> str:
    head = ["config", "n", "n̄", "λ", "pairs", "W ms", "T ms", "T/W", "IQR", "processes", "floor", "FLOPs T/W",
            "paper", "goal", "W MB", "T MB", "mem T/W", "mem goal"]
    lines = []
    for r in rows:
        if r.get("status") != "ok":
            lines.append([r["config"], str(r.get("n", "")), str(r.get("nbar", "")), _fmt(r.get("lam"), "g"),
                          "", "", "", r.get("status", "error").split(" (")[0], "", "", "", "", r.get("paper", ""),
                          _fmt(r.get("goal_ratio"), ".2f").join(["≤", "×"]) if r.get("goal_ratio") else "",
                          "", "", "", ""])
            continue
        lines.append([
            r["config"] + (" (eval fwd)" if r["mode"] == "eval" else ""), str(r["n"]), r["nbar"],
            _fmt(r["lam"], "g"), str(r["pairs"]),
            _fmt(r["weight_median_s"] * 1e3, ".2f"), _fmt(r["target_median_s"] * 1e3, ".2f"),
            _fmt(r["ratio"], ".2f") + "×", f"{r['ratio_p25']:.2f}–{r['ratio_p75']:.2f}", _processes(r),
            _fmt(r.get("floor_ratio"), ".2f") + ("×" if r.get("floor_ratio") else ""),
            _fmt(r.get("flop_ratio"), ".2f") + ("×" if r.get("flop_ratio") else ""),
            r["paper"], f"≤{r['goal_ratio']:.2f}×" if r["goal_ratio"] else "",
            _fmt(r.get("weight_peak_mb"), ".1f"), _fmt(r.get("target_peak_mb"), ".1f"),
            _fmt(r.get("mem_ratio"), ".2f") + ("×" if r.get("mem_ratio") else ""),
            f"≤{r['goal_mem_ratio']:.0f}×" if r["goal_mem_ratio"] else "",
        ])
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)] if lines else map(len, head)
    widths = list(widths)
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(l, widths)) for l in lines]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="all",
                   help="comma-separated subset of: " + ",".join(BY_NAME) + " (default: all)")
    p.add_argument("--steps", type=int, default=None,
                   help="measured pairs (one step of each model) per configuration (default: per config)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps of each model (default 3 CPU, 10 CUDA)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 warm-up step, at most 4 pairs")
    p.add_argument("--budget", type=float, default=90.0,
                   help="stop a configuration's timing after this many seconds (at least 5 pairs; 0 = never)")
    p.add_argument("--max-positions", type=int, default=2048,
                   help="value passed as max_positions for cnn-approx, if the library has that option")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--no-floor", action="store_true",
                   help="skip the physical floor (a weight-space step that also forwards and backpropagates "
                        "the reference batch, stepped interleaved with the other two)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count (torch.utils.flop_counter)")
    p.add_argument("--profile", default="",
                   help="comma-separated configs: also print a torch.profiler table of one target-space step")
    p.add_argument("--profile-rows", type=int, default=20)
    p.add_argument("--repeats", type=int, default=1,
                   help="measure each training configuration this many times, each repeat after the first in a "
                        "fresh process (the ratio moves by up to 10%% from process to process on a shared "
                        "machine); the table then adds the median and range of the per-process ratios")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="directory for the JSON")
    args = p.parse_args(argv)

    names = list(BY_NAME) if args.configs == "all" else [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        p.error(f"unknown config(s) {unknown}; choose from {list(BY_NAME)}")
    args.profile = [c.strip() for c in args.profile.split(",") if c.strip()]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    torch.set_num_threads(args.threads)
    info = machine_info(device)
    print(f"# {info['cpu_model']} | torch {info['torch_version']} | threads {info['torch_num_threads']} | "
          f"device {device}{' (' + info['gpu'] + ')' if info['gpu'] else ''} | load {info['loadavg_start']}",
          flush=True)

    rows = []
    for name in names:
        cfg = BY_NAME[name]
        t0 = time.perf_counter()
        try:
            row = run_config(cfg, args, device)
        except Exception as e:  # report and go on: the library is changing under this benchmark
            row = {"config": name, "status": f"error ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                   "traceback": traceback.format_exc(), "n": cfg.n, "nbar": cfg.nbar, "lam": cfg.lam,
                   "paper": cfg.paper, "goal_ratio": cfg.goal}
        if row.get("status") == "ok" and args.repeats > 1 and row.get("mode") == "train":
            repeat_in_fresh_processes(row, args)
        rows.append(row)
        if row.get("status") == "ok":
            msg = (f"{row['ratio']:.2f}× (IQR {row['ratio_p25']:.2f}–{row['ratio_p75']:.2f}) over "
                   f"{row['pairs']} pairs" + (f"; floor {row['floor_ratio']:.2f}×" if "floor_ratio" in row else "")
                   + (f"; {len(row['process_ratios'])} processes: " + ", ".join(
                       f"{r:.2f}×" for r in row["process_ratios"]) if "process_ratios" in row else ""))
        else:
            msg = row.get("status")
        print(f"# {name}: {msg} [{time.perf_counter() - t0:.0f} s]", flush=True)
        if row.get("traceback"):
            print(row["traceback"], file=sys.stderr)

    info["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print()
    print(table(rows))
    print(f"\nT/W: median of per-pair ratios (target-space step / weight-space step), IQR = 25th–75th "
          f"percentile of those ratios; processes (--repeats): median [range] of T/W over fresh processes. floor: the same for a weight-space step that also forwards and "
          f"backpropagates the reference batch (the physical floor). FLOPs T/W: the ratio of counted floating-point operations (matrix products and convolutions, torch.utils.flop_counter), the arithmetic floor of T/W. Memory: peak per model in isolation ({'CUDA allocator' if device.type == 'cuda' else 'CPU allocator via torch.profiler'}).")
    for r in rows:
        for w in r.get("conversion_warnings", []) or []:
            print(f"  note {r['config']}: {w[:110]}")
    for r in rows:
        if r.get("profile"):
            print(f"\n# torch.profiler, one target-space step of {r['config']}:\n{r['profile']}")

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"{machine_tag(info)}-{stamp}.json"
    path.write_text(json.dumps({"machine": info, "args": vars(args), "rows": rows}, indent=1, default=str))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
