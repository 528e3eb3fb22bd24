"""Beyond the paper: does target space train deeper plain networks, or is it robustness to initialisation?

tanh MLPs without normalisation, 784 → 128 × (depth − 1) → 10 (``depth`` Linear layers), on Fashion-MNIST,
trained with Adam for ``--steps`` minibatches of 100 and tested on the 10,000 test images. Methods, each
with the same learning-rate grid and the same seeds:

* ``target``: target space (SCU), targets truncated normal σ = 1 then projected (eq. 13, the paper's dense
  setting), reference batch of ``--n-ref`` training images (256 ≥ 129 rows: every hidden layer full rank; the
  first layer, 785 rows, is not), λ ``--lam``;
* ``target_project``: target space from the same Glorot weights as ``weight_glorot``, ``init="project"``
  (eq. 13: the targets are the sums those weights achieve on X̄, so the model's function is kept);
* ``target_sigma01``: as ``target`` with random targets of σ = 0.1, projected;
* ``weight_glorot``: weight space with Glorot uniform weights and zero biases (the paper's baseline);
* ``weight_default``: weight space with PyTorch's default initialisation;
* ``weight_layernorm``: PyTorch's default initialisation with LayerNorm before every hidden tanh (the
  practitioner's alternative).

Every run also records, every 50 steps, the loss and accuracy on the reference batch itself (for the target
methods; the same images for the others), and the step-0 diagnostics per Linear layer: the weight gain
‖W‖_F/√d_out of the weights the first training forward uses (realised, for the target methods) and the norm
of the gradient of the learnable tensor (the targets, or the weights) on the first minibatch.

Each finished run is written to ``<out>/depth.json`` at once; rerunning the same command skips the finished
(depth, method, lr, seed) points, so a sweep can be stopped and continued. ``<out>/depth.png``: test accuracy
against depth per method at its best learning rate (by mean over seeds), the band spanning the seeds.

    python examples/cnn.py --prepare-data     # once: Fashion-MNIST under data/ (see examples/cnn.py)
    python examples/depth.py --depths 4,8,16,32,64 --seeds 3 --steps 600 --out docs/depth
    python examples/depth.py --quick --out /tmp/depth   # a smoke test
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import target_param as tp  # noqa: E402
from cnn import load_dataset, synthetic_dataset  # noqa: E402

METHODS = ("target", "target_project", "target_sigma01", "weight_glorot", "weight_default", "weight_layernorm")
STYLES = {"target": ("C3", "o"), "target_project": ("C4", "v"), "target_sigma01": ("C5", "P"),
          "weight_glorot": ("C0", "s"), "weight_default": ("C2", "^"), "weight_layernorm": ("C1", "D")}
INIT = {"target": ("random", 1.0), "target_project": ("project", 1.0), "target_sigma01": ("random", 0.1)}


class DeepTanh(nn.Module):
    """``depth`` Linear layers of width ``width`` with tanh between them, optionally LayerNorm before each tanh."""

    def __init__(self, depth: int, width: int = 128, layernorm: bool = False):
        super().__init__()
        sizes = [784] + [width] * (depth - 1) + [10]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth - 1)) if layernorm else None

    def forward(self, x):
        for k, layer in enumerate(self.layers[:-1]):
            x = layer(x)
            x = torch.tanh(self.norms[k](x) if self.norms is not None else x)
        return self.layers[-1](x)


def build(method: str, depth: int, ref, args) -> nn.Module:
    model = DeepTanh(depth, args.width, layernorm=method == "weight_layernorm")
    if method in INIT or method == "weight_glorot":
        for layer in model.layers:
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
    model.conversion_warnings = []
    if method in INIT:
        init, std = INIT[method]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tp.to_target_space(model, ref, lam=args.lam, init=init, target_std=std)
        model.conversion_warnings = sorted({w.category.__name__ for w in caught})
    return model


@torch.no_grad()
def accuracy(model, x, y, chunk=2000) -> float:
    model.eval()
    hits = sum(int((model(x[i:i + chunk]).argmax(1) == y[i:i + chunk]).sum()) for i in range(0, len(x), chunk))
    model.train()
    return hits / len(x)


def step0(model: nn.Module) -> dict:
    """Per Linear layer, after the first backward: the gain ‖W‖_F/√d_out of the weight the forward used, and the
    norm of the learnable tensor's gradient (the targets in target space, else the weight)."""
    gains, grads = [], []
    with torch.no_grad():
        for layer in model.layers:
            w = layer.weight  # realised in target space (no new realisation: nothing changed since the forward)
            gains.append(round(float(w.norm() / w.shape[0] ** 0.5), 4))
            learn = layer.parametrizations.weight.original if tp.is_target_space(layer) else layer.weight
            grads.append(float(learn.grad.norm()) if learn.grad is not None else 0.0)
    return {"gain": gains, "grad_norm": grads}


def run_one(data, depth: int, method: str, lr: float, seed: int, args) -> dict:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    ref_idx = torch.randperm(len(data["x_train"]), generator=g)[:args.n_ref]
    ref = data["x_train"][ref_idx]
    model = build(method, depth, ref, args)
    opt = torch.optim.Adam(model.parameters(), lr)
    t0, losses, ref_curve, diverged, diag = time.perf_counter(), [], [], False, None
    y_ref = data["y_train"][ref_idx]
    for step in range(args.steps):
        idx = torch.randint(len(data["x_train"]), (args.batch,), generator=g)
        opt.zero_grad(set_to_none=True)
        try:
            loss = F.cross_entropy(model(data["x_train"][idx]), data["y_train"][idx])
            loss.backward()
        except tp.TargetSpaceError as e:  # a diverged target-space run: its solves fail
            diverged, losses = True, losses + [str(type(e).__name__)]
            break
        if not torch.isfinite(loss):
            diverged = True
            break
        if step == 0:
            diag = step0(model)
        opt.step()
        if step % 50 == 0:
            losses.append(round(loss.item(), 4))
            ref_curve.append(reference_fit(model, ref, y_ref))
    seconds = time.perf_counter() - t0
    try:
        test = accuracy(model, data["x_test"], data["y_test"]) if not diverged else 0.1
    except tp.TargetSpaceError:
        test, diverged = 0.1, True
    return {"depth": depth, "method": method, "lr": lr, "seed": seed, "test_acc": test, "diverged": diverged,
            "loss_every_50": losses, "ref_every_50": ref_curve, "step0": diag, "seconds": round(seconds, 2), "steps": args.steps,
            "conversion_warnings": model.conversion_warnings}


@torch.no_grad()
def reference_fit(model, ref, y_ref) -> list[float]:
    """[loss, accuracy] on the reference batch itself (after the step; no realisation is saved by it)."""
    try:
        out = model(ref)
    except tp.TargetSpaceError:
        return [float("nan"), 0.1]
    return [round(float(F.cross_entropy(out, y_ref)), 4), round(float((out.argmax(1) == y_ref).float().mean()), 4)]


def best_by_lr(runs: list[dict], depth: int, method: str) -> tuple[float, list[float]] | None:
    """The learning rate with the best mean test accuracy over seeds, and its accuracies."""
    by_lr: dict = {}
    for r in runs:
        if r["depth"] == depth and r["method"] == method:
            by_lr.setdefault(r["lr"], []).append(r["test_acc"])
    if not by_lr:
        return None
    lr = max(by_lr, key=lambda k: statistics.fmean(by_lr[k]))
    return lr, by_lr[lr]


def plot(runs: list[dict], depths: list[int], path: Path, steps: int) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m in METHODS:
        pts = [(d, best_by_lr(runs, d, m)) for d in depths]
        pts = [(d, b) for d, b in pts if b is not None]
        if not pts:
            continue
        colour, marker = STYLES[m]
        xs = [d for d, _ in pts]
        ax.plot(xs, [statistics.fmean(b[1]) for _, b in pts], marker=marker, color=colour, label=m)
        ax.fill_between(xs, [min(b[1]) for _, b in pts], [max(b[1]) for _, b in pts], color=colour, alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.set_xlabel("depth (Linear layers), width 128, tanh")
    ax.set_ylabel("Fashion-MNIST test accuracy")
    ax.set_title(f"Best learning rate per method, {steps} Adam steps; band: seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def step0_at(data, depth: int, method: str, seed: int, args) -> dict:
    """Step-0 diagnostics of a fresh model (one minibatch's forward and backward, no step): cheap, so computed
    anew for the figure rather than read from runs that predate them."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    ref = data["x_train"][torch.randperm(len(data["x_train"]), generator=g)[:args.n_ref]]
    model = build(method, depth, ref, args)
    idx = torch.randint(len(data["x_train"]), (args.batch,), generator=g)
    F.cross_entropy(model(data["x_train"][idx]), data["y_train"][idx]).backward()
    return step0(model)


def plot_step0(diag: dict, depth: int, path: Path) -> None:
    """Per layer at step 0: weight gain, and the norm of the learnable tensor's gradient (log scale)."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for m, d in diag.items():
        colour, marker = STYLES[m]
        xs = range(1, len(d["gain"]) + 1)
        a.plot(xs, d["gain"], marker=marker, ms=3, color=colour, label=m)
        b.semilogy(xs, [max(v, 1e-30) for v in d["grad_norm"]], marker=marker, ms=3, color=colour, label=m)
    a.set_title(f"depth {depth}: weight gain ‖W‖_F/√d_out at step 0")
    b.set_title("‖∂L/∂(targets or weights)‖ per layer, first minibatch")
    for ax in (a, b):
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--depths", default="4,8,16,32,64")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--lrs", default="1e-4,1e-3,1e-2", help="the learning-rate grid, the same for every method")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--n-ref", type=int, default=256)
    p.add_argument("--lam", type=float, default=1e-3)
    p.add_argument("--data-root", type=Path, default=Path("data"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("docs/depth"))
    p.add_argument("--quick", action="store_true",
                   help="synthetic data (cnn.py's), depths 2,3; 20 steps; 1 seed; 2 learning rates: a smoke test")
    args = p.parse_args(argv)
    if args.quick:
        args.depths, args.steps, args.seeds, args.lrs, args.n_ref = "2,3", 20, 1, "1e-3,1e-2", 64
    torch.set_num_threads(args.threads)
    depths = [int(d) for d in args.depths.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    if bad := [m for m in methods if m not in METHODS]:
        p.error(f"unknown methods {bad}; choose from {METHODS}")
    lrs = [float(v) for v in args.lrs.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    js = args.out / "depth.json"
    settings = {k: getattr(args, k) for k in ("steps", "batch", "width", "n_ref", "lam", "quick")}
    state = json.loads(js.read_text()) if js.is_file() else {"settings": settings, "runs": []}
    if state["settings"] != settings:
        raise SystemExit(f"{js} was run with other settings {state['settings']}; use another --out")
    done = {(r["depth"], r["method"], r["lr"], r["seed"]) for r in state["runs"]}
    data = synthetic_dataset(500, 200) if args.quick else load_dataset("fashion", args.data_root)
    mean, std = data["x_train"].mean(), data["x_train"].std()
    data = {k: ((v.reshape(len(v), -1).float() - mean) / std if k.startswith("x") else v) for k, v in data.items()}
    jobs = [(d, m, lr, s) for d in depths for m in methods for lr in lrs for s in range(args.seeds)
            if (d, m, lr, s) not in done]
    t0 = time.perf_counter()
    for d, m, lr, s in tqdm(jobs, desc="depth study", unit="run", file=sys.stdout, dynamic_ncols=True):
        r = run_one(data, d, m, lr, s, args)
        state["runs"].append(r)
        state["wall_seconds"] = state.get("wall_seconds", 0.0) + r["seconds"]
        state["torch"] = torch.__version__
        js.write_text(json.dumps(state, indent=1))
        tqdm.write(f"depth {d:<3} {m:<17} lr {lr:g} seed {s}: test {r['test_acc']:.4f}"
                   f"{' (diverged)' if r['diverged'] else ''}, {r['seconds']:.1f} s", file=sys.stdout)
    plot(state["runs"], depths, args.out / "depth.png", args.steps)
    deep = 32 if 32 in depths else max(depths)
    diag = {m: step0_at(data, deep, m, 0, args) for m in METHODS if m != "weight_layernorm"}
    state["step0"] = {"depth": deep, "seed": 0, "methods": diag}
    js.write_text(json.dumps(state, indent=1))
    plot_step0(diag, deep, args.out / f"depth{deep}_step0.png")
    print(f"\nbest learning rate per method: mean test accuracy over seeds [min-max] ({time.perf_counter() - t0:.0f} s)")
    for d in depths:
        cells = []
        for m in methods:
            b = best_by_lr(state["runs"], d, m)
            cells.append("-" if b is None else f"{statistics.fmean(b[1]):.3f} [{min(b[1]):.3f}-{max(b[1]):.3f}] lr {b[0]:g}")
        print(f"depth {d:>3}: " + " | ".join(f"{m} {c}" for m, c in zip(methods, cells)))
    return state


if __name__ == "__main__":
    main()
