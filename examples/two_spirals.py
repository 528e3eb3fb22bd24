"""Two-spirals in target space versus weight space.

Reproduces the two-spirals experiment of Fairbank, Samothrakis and Citi, "Deep Learning in Target Space",
JMLR 23 (2022), section 5.1 and Fig. 4: a 2-5-5-5-2 tanh network with all shortcut connections, softmax and
cross-entropy, trained full batch with Adam (lr 0.01) for 4,000 iterations, once in target space and once in
weight space, from the same data.

* Data: the classic Lang & Witbrock (1988) set of 194 points, 97 per spiral over three revolutions. For
  i = 0..96 the angle is i·π/16 and the radius 6.5·(104 − i)/104; the point (r sin θ, r cos θ) is class 0
  and its negation class 1. The test set is the angular midpoints, i + 0.5 for i = 0..96 (194 points).
  Inputs are divided by ``--input-scale`` (6.5), so that they lie in [-1, 1]².
* Target space: the reference batch is the 194 training inputs (n̄ = 194), λ = 0.001, targets drawn from a
  truncated normal with σ = 1 and then projected onto the achievable targets (eq. 13, ``init="random"``),
  sequential cascade untangling (SCU, Algorithm 2) unless ``--cascade optimistic``.
* Weight space: Glorot (Xavier) uniform weights, zero biases.

The script prints the final train/test accuracies, the iteration at which each method first classified
the whole training set correctly, and the time per iteration; it writes ``two_spirals.png`` (the two
decision surfaces side by side, like Fig. 4) and ``two_spirals.json`` (the raw numbers) to ``--out``.

    python examples/two_spirals.py                 # the paper's settings, 4,000 iterations
    python examples/two_spirals.py --quick         # 300 iterations, a smoke test
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

import target_param as tp  # noqa: E402

SPIRAL_RADIUS = 6.5  # the outermost radius of the classic data set


# ------------------------------------------------------------------------------------------ data
def spiral_points(positions: Tensor) -> tuple[Tensor, Tensor]:
    """Points of both spirals at (possibly fractional) positions along them, classes interleaved.

    Lang & Witbrock (1988): angle i·π/16, radius 6.5·(104 − i)/104, point (r sin θ, r cos θ) for class 0 and
    its negation for class 1. Returns inputs (2N, 2) in the original units and labels (2N,).
    """
    theta = positions * math.pi / 16
    radius = SPIRAL_RADIUS * (104 - positions) / 104
    p = torch.stack([radius * torch.sin(theta), radius * torch.cos(theta)], dim=1)
    x = torch.stack([p, -p], dim=1).reshape(-1, 2)
    y = torch.tensor([0, 1]).repeat(len(positions))
    return x, y


def two_spirals(dtype=torch.float32) -> dict[str, Tensor]:
    """The 194 training points (i = 0..96) and the 194 angular-midpoint test points (i + 0.5)."""
    i = torch.arange(97, dtype=torch.float64)
    x_train, y_train = spiral_points(i)
    x_test, y_test = spiral_points(i + 0.5)
    return {"x_train": x_train.to(dtype), "y_train": y_train, "x_test": x_test.to(dtype), "y_test": y_test}


# ------------------------------------------------------------------------------------------ network
class TwoSpiralsNet(nn.Module):
    """An MLP with all shortcut connections (Riedmiller and Braun, 1993), e.g. 2-5-5-5-2.

    Every layer's input is the concatenation of the network input and every earlier hidden layer's output,
    so the widths of the layer inputs are 2, 7, 12 and 17. Hidden layers use tanh; the output layer gives
    logits for softmax + cross-entropy.
    """

    def __init__(self, n_in: int = 2, hidden: tuple[int, ...] = (5, 5, 5), n_out: int = 2,
                 batchnorm: bool = False):
        super().__init__()
        self.hidden = nn.ModuleList()
        # Optional BatchNorm1d after each hidden Linear, before tanh (the weight-space + BN baseline of Fig. 6).
        self.norms = nn.ModuleList([nn.BatchNorm1d(h) for h in hidden]) if batchnorm else None
        width = n_in
        for h in hidden:
            self.hidden.append(nn.Linear(width, h))
            width += h
        self.out = nn.Linear(width, n_out)

    def glorot_(self) -> TwoSpiralsNet:
        """Glorot & Bengio (2010) uniform weights and zero biases, for weight-space training."""
        for layer in [*self.hidden, self.out]:
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        return self

    def forward(self, x: Tensor) -> Tensor:
        feats = x
        for k, layer in enumerate(self.hidden):
            s = layer(feats)
            if self.norms is not None:
                s = self.norms[k](s)
            feats = torch.cat([feats, torch.tanh(s)], dim=1)
        return self.out(feats)


# ------------------------------------------------------------------------------------------ training
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """(cross-entropy loss, accuracy) of ``model`` on (x, y), in eval mode (BatchNorm uses running stats)."""
    was_training = model.training
    model.eval()
    logits = model(x)
    model.train(was_training)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def train(name: str, model: nn.Module, data: dict[str, Tensor], args, device: torch.device, *,
          lr: float | None = None, optimizer: str = "adam", progress: bool = True) -> dict:
    """Full-batch Adam (or plain SGD: ``optimizer="sgd"``, batch gradient descent, Fig. 5-left). The loop is the
    same for both spaces; only the model was converted beforehand. ``lr`` defaults to ``--lr-target`` or
    ``--lr-weight`` by ``name``.

    The training accuracy is read every iteration from the logits of the training forward pass itself (the
    model after ``it`` updates), so the first iteration with 100% training accuracy costs nothing extra.
    The full evaluation (loss and accuracy on both sets) runs every ``--eval-every`` iterations and is not
    timed.
    """
    if lr is None:
        lr = args.lr_target if name == "target" else args.lr_weight
    opt = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[optimizer](model.parameters(), lr=lr)
    x, y = data["x_train"], data["y_train"]
    curve = {"iter": [], "train_loss": [], "train_acc": [], "test_loss": [], "test_acc": []}
    step_seconds, first_perfect = [], None

    def log(it: int) -> None:
        for split in ("train", "test"):
            loss, acc = evaluate(model, data[f"x_{split}"], data[f"y_{split}"])
            curve[f"{split}_loss"].append(loss)
            curve[f"{split}_acc"].append(acc)
        curve["iter"].append(it)

    bar = tqdm(range(args.iters), desc=f"{name} space", unit="it", dynamic_ncols=True, file=sys.stdout,
                disable=not progress)
    for it in bar:
        if it % args.eval_every == 0:
            log(it)
            bar.set_postfix(loss=f"{curve['train_loss'][-1]:.4f}", train=f"{curve['train_acc'][-1]:.3f}",
                            test=f"{curve['test_acc'][-1]:.3f}")
        sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        opt.step()
        sync(device)
        step_seconds.append(time.perf_counter() - t0)
        if first_perfect is None and bool((logits.argmax(1) == y).all()):
            first_perfect = it  # the model after `it` updates classified every training point
    bar.close()
    log(args.iters)
    if first_perfect is None and curve["train_acc"][-1] == 1.0:
        first_perfect = args.iters
    return {
        "lr": lr,
        "optimizer": optimizer,
        "curve": curve,
        "final_train_loss": curve["train_loss"][-1],
        "final_train_acc": curve["train_acc"][-1],
        "final_test_loss": curve["test_loss"][-1],
        "final_test_acc": curve["test_acc"][-1],
        "first_100pct_train_iter": first_perfect,
        "seconds_per_iter_mean": statistics.fmean(step_seconds) if step_seconds else None,
        "seconds_per_iter_median": statistics.median(step_seconds) if step_seconds else None,
        "train_seconds_total": sum(step_seconds),
    }


# ------------------------------------------------------------------------------------------ plotting
@torch.no_grad()
def surface(model: nn.Module, scale: float, resolution: int, device, dtype) -> Tensor:
    """P(class 1) on a resolution × resolution grid over [-6.5, 6.5]² (original units), rows from top."""
    ticks = torch.linspace(-SPIRAL_RADIUS, SPIRAL_RADIUS, resolution, dtype=dtype)
    gy, gx = torch.meshgrid(ticks.flip(0), ticks, indexing="ij")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1).to(device) / scale
    return torch.softmax(model(grid), dim=1)[:, 1].reshape(resolution, resolution).cpu()


def plot(panels: list[tuple[str, Tensor, dict]], data: dict[str, Tensor], path: Path, iters: int) -> None:
    """Fig. 4 style: grey-scale network output, training points as circles, test points as crosses."""
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 6.4), squeeze=False)
    extent = [-SPIRAL_RADIUS, SPIRAL_RADIUS, -SPIRAL_RADIUS, SPIRAL_RADIUS]
    for ax, (title, prob, res) in zip(axes[0], panels):
        ax.imshow(prob.numpy(), cmap="gray", vmin=0, vmax=1, extent=extent, interpolation="bilinear")
        ax.contour(prob.flip(0).numpy(), levels=[0.5], colors="#888888", linewidths=0.6, extent=extent)
        for split, marker in (("train", "o"), ("test", "x")):
            x, y = data[f"x_{split}_raw"], data[f"y_{split}"]
            for cls, colour in ((0, "tab:red"), (1, "tab:blue")):
                pts = x[y == cls]
                style = {"edgecolors": "0.5", "linewidths": 0.8} if marker == "o" else {"linewidths": 1.4}
                ax.scatter(pts[:, 0], pts[:, 1], s=24, marker=marker, c=colour, label=f"{split} class {cls}",
                           **style)
        first = res["first_100pct_train_iter"]
        ax.set_title(f"{title}\ntrain {100 * res['final_train_acc']:.1f}%, test {100 * res['final_test_acc']:.1f}%;"
                     f" 100% train {'never reached' if first is None else f'from iteration {first}'}", fontsize=11)
        ax.set_xlim(extent[:2])
        ax.set_ylim(extent[2:])
        ax.set_aspect("equal")
    axes[0][0].legend(loc="lower left", fontsize=7, framealpha=0.8)
    fig.suptitle(f"Two-spirals, 2-5-5-5-2 tanh with all shortcuts, Adam, {iters} full-batch iterations "
                 "(grey: P(class 1), black = 0, white = 1)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--iters", type=int, default=4000, help="full-batch Adam iterations (Fig. 4: 4,000)")
    p.add_argument("--lr-target", type=float, default=0.01, help="Adam learning rate in target space")
    p.add_argument("--lr-weight", type=float, default=0.01, help="Adam learning rate in weight space")
    p.add_argument("--lam", type=float, default=1e-3, help="ridge λ of eq. 6-7")
    p.add_argument("--target-std", type=float, default=1.0, help="σ of the truncated-normal initial targets")
    p.add_argument("--cascade", choices=["sequential", "optimistic"], default="sequential",
                   help="SCU (Algorithm 2) or OCU (eq. 8)")
    p.add_argument("--hidden", type=str, default="5,5,5", help="hidden layer widths, comma separated")
    p.add_argument("--input-scale", type=float, default=SPIRAL_RADIUS,
                   help="inputs are divided by this (6.5 maps the data into [-1, 1]²)")
    p.add_argument("--seed", type=int, default=0, help="seeds both initialisations")
    p.add_argument("--eval-every", type=int, default=40, help="iterations between logged evaluations")
    p.add_argument("--grid", type=int, default=301, help="decision-surface resolution per side")
    p.add_argument("--device", type=str, default="cpu", help="torch device (the net is tiny: cpu is fastest)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch; the matrices are tiny, so more threads only add overhead")
    p.add_argument("--out", type=Path, default=Path("out/two_spirals"), help="output folder")
    p.add_argument("--quick", action="store_true", help="300 iterations and a coarser grid, for a smoke test")
    args = p.parse_args(argv)
    if args.quick:
        args.iters, args.grid = min(args.iters, 300), min(args.grid, 101)
    if args.iters < 0 or args.eval_every < 1 or args.grid < 2 or args.threads < 1:
        p.error("--iters must be ≥ 0, --eval-every ≥ 1, --grid ≥ 2 and --threads ≥ 1")
    args.hidden = tuple(int(h) for h in args.hidden.split(","))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), torch.float32
    raw = two_spirals(dtype)
    data = {k: v.to(device) for k, v in raw.items()}
    data["x_train"], data["x_test"] = data["x_train"] / args.input_scale, data["x_test"] / args.input_scale
    data["x_train_raw"], data["x_test_raw"] = raw["x_train"], raw["x_test"]
    print(f"two-spirals: {len(raw['y_train'])} training and {len(raw['y_test'])} test points; "
          f"network 2-{'-'.join(map(str, args.hidden))}-2 with all shortcuts; {args.iters} iterations on {device}")

    # Target space: the reference batch is the whole training set (n̄ = 194).
    torch.manual_seed(args.seed)
    target_model = TwoSpiralsNet(hidden=args.hidden).to(device)
    tp.to_target_space(target_model, data["x_train"], lam=args.lam, init="random",
                       target_std=args.target_std, cascade=args.cascade)
    target = train("target", target_model, data, args, device)
    with torch.no_grad():
        logits_in_target_space = target_model(data["x_train"])
    tp.to_weight_space(target_model)  # a plain model again, with the realised weights
    with torch.no_grad():
        target["conversion_max_abs_logit_change"] = (target_model(data["x_train"]) - logits_in_target_space
                                                     ).abs().max().item()

    # Weight space: the same network, Glorot initialisation.
    torch.manual_seed(args.seed)
    weight_model = TwoSpiralsNet(hidden=args.hidden).to(device).glorot_()
    weight = train("weight", weight_model, data, args, device)

    ratio = target["seconds_per_iter_median"] / weight["seconds_per_iter_median"] if args.iters else None
    summary = {
        "paper": "Fairbank, Samothrakis, Citi, Deep Learning in Target Space, JMLR 2022, section 5.1, Fig. 4",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data": {"n_train": len(raw["y_train"]), "n_test": len(raw["y_test"]), "reference_batch": "x_train"},
        "target_space": target,
        "weight_space": weight,
        "time_ratio_target_over_weight": ratio,
        "torch": torch.__version__,
    }

    args.out.mkdir(parents=True, exist_ok=True)
    panels = [(f"Target space ({'SCU' if args.cascade == 'sequential' else 'OCU'})",
               surface(target_model, args.input_scale, args.grid, device, dtype), target),
              ("Weight space", surface(weight_model, args.input_scale, args.grid, device, dtype), weight)]
    png, js = args.out / "two_spirals.png", args.out / "two_spirals.json"
    plot(panels, {k: v.cpu() for k, v in data.items()}, png, args.iters)
    js.write_text(json.dumps(summary, indent=1))

    print(f"\n{'':14}{'train acc':>10}{'test acc':>10}{'100% train at':>15}{'ms / iter':>11}")
    for label, res in (("target space", target), ("weight space", weight)):
        first = res["first_100pct_train_iter"]
        ms = 1e3 * res["seconds_per_iter_median"] if args.iters else float("nan")
        print(f"{label:14}{res['final_train_acc']:>10.4f}{res['final_test_acc']:>10.4f}"
              f"{'never' if first is None else first:>15}{ms:>11.3f}")
    if ratio is not None:
        print(f"time per iteration, target / weight space: {ratio:.2f}× (paper: 3.5× on a K80 with TF1)")
    print(f"wrote {png} and {js}")
    return summary


if __name__ == "__main__":
    main()
