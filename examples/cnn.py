"""A CNN on Fashion-MNIST (or MNIST) in target space versus weight space, with and without BatchNorm.

Reproduces the set-up of the CNN experiments of Fairbank, Samothrakis and Citi, "Deep Learning in Target
Space", JMLR 23 (2022), section 5.2, Table 1 (architecture) and Table 2 (test accuracies), at a budget that
a CPU can afford (the paper gave each MNIST-sized network 8 GPU hours: ~480 epochs in target space, 3,000 in
weight space).

* Data: the 60,000/10,000 28×28 grey-scale images of Fashion-MNIST (``--dataset fashion``, default) or MNIST
  (``--dataset mnist``), pixels scaled to [0, 1], no augmentation. The files are read by
  ``torchvision.datasets.<FashionMNIST|MNIST>(root, download=False)`` from ``<--data-root>/<Class>/raw/``.
  Nothing is downloaded unless ``--download`` is given. On Debian/Ubuntu the data come as a package, and
  one command unpacks them where torchvision looks (``--prepare-data`` gunzips ``--source-dir`` into
  ``<--data-root>/FashionMNIST/raw/`` with torchvision's file names, then exits)::

      apt-get install -y dataset-fashion-mnist && python examples/cnn.py --prepare-data

  For MNIST point ``--source-dir`` at a folder holding the four ``*-idx?-ubyte.gz`` files and add
  ``--dataset mnist``.
* Network (Table 1, MNIST and MNIST-Fashion): six compound layers (3-16-1)-(3-16-2)-(3-32-1)-(3-32-2)-
  (3-64-1)-(3-64-2), each (m, c, k) a 3×3 convolution with c channels, stride 1 and ``same`` padding, then
  leaky-relu (slope 0.2, eq. 22), then a k×k max-pool of stride k (k = 1: none). 28 → 14 → 7 → 3, so the
  flattened features are 64·3·3 = 576, followed by dense 128 (leaky-relu) and 10 (softmax + cross-entropy).
* ``target``: the reference batch is n̄ = 100 fixed training images (a random draw per seed), λ = 0.1,
  targets truncated normal with σ = 0.1 then projected (eq. 13, ``init="random"``), Adam lr 0.01.
  The dense layers see n̄ = 100 columns for 577 and 129 rows, so the library warns that their Grams are
  rank-deficient; that is the paper's setting too and λ keeps the solves well posed.
* ``weight``: He (Kaiming normal, leaky-relu gain) weights, zero biases, Adam lr 0.001.
  ``weight_bn``: the same plus BatchNorm after every convolution and the non-final dense layer (before the
  activation), as the paper applied it.
* ``--max-positions N`` (section 4.2, the approximate option): the target-space model solves each conv layer
  on N fixed random patch columns of the reference batch instead of all of them (default: all, exact).
* ``--dropout 0.2`` (Table 2, "with dropout"): dropout after every even-numbered compound conv layer and the
  non-final dense layer.
* Every method gets the same number of epochs (``--epochs``, fractions allowed) of minibatches of 100
  (reshuffled each epoch). The test accuracy on the whole test set is evaluated every ``--eval-every``
  steps (not timed) so that short budgets still give curves; the training wall time (excluding evaluation)
  is recorded too. With ``--workers 2`` the runs go two at a time, the two seeds of a method together, each
  process on ``--threads`` torch threads.

It writes ``cnn.json`` (configuration, measured seconds per step, every run's curve, and per method the
final test accuracy mean ± std over seeds and the training wall time) and ``cnn.png`` (test accuracy against
epoch and against training wall time) to ``--out``.

    python examples/cnn.py --prepare-data                   # unpack the Debian files (once)
    python examples/cnn.py --measure                        # seconds per step of each method, then exit
    python examples/cnn.py --epochs 1 --seeds 2 --workers 2 # the study in docs/cnn/
    python examples/cnn.py --quick                          # synthetic data, < 1 minute: a smoke test
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import gzip
import json
import math
import multiprocessing as mp
import os
import shutil
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
from torch import Tensor, nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

import target_param as tp  # noqa: E402

METHODS = ("target", "weight", "weight_bn")
LABELS = {"target": "Target space", "weight": "Weight space", "weight_bn": "Weight space + BatchNorm"}
COLOURS = {"target": "tab:red", "weight": "tab:blue", "weight_bn": "tab:green"}
PAPER_TABLE2 = {  # Table 2, no dropout / with dropout (test accuracy, %)
    "fashion": {"weight": (91.6, 93.12), "weight_bn": (91.6, 94.07), "target": (92.2, 93.7)},
    "mnist": {"weight": (99.26, 99.50), "weight_bn": (99.41, 99.58), "target": (99.29, 99.55)},
}
ARCH = ((3, 16, 1), (3, 16, 2), (3, 32, 1), (3, 32, 2), (3, 64, 1), (3, 64, 2))  # Table 1: (m, c, k)
DENSE = (128,)
RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")
TV_CLASS = {"fashion": "FashionMNIST", "mnist": "MNIST"}
DEBIAN_DIR = {"fashion": "/usr/share/datasets/fashion-mnist", "mnist": "/usr/share/datasets/mnist"}


# ------------------------------------------------------------------------------------------ data
def prepare(source_dir: str | Path, root: str | Path, dataset: str = "fashion") -> Path:
    """Gunzip the four IDX files of ``source_dir`` into ``<root>/<FashionMNIST|MNIST>/raw/`` with torchvision's
    names, so that ``torchvision.datasets.<Class>(root, download=False)`` finds them. Returns the raw folder.
    Already unpacked files are left alone."""
    source_dir = Path(source_dir)
    raw = Path(root) / TV_CLASS[dataset] / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in RAW_FILES:
        dest = raw / name
        if dest.is_file() and dest.stat().st_size > 0:
            continue
        gz, plain = source_dir / f"{name}.gz", source_dir / name
        if gz.is_file():
            with gzip.open(gz, "rb") as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst)
        elif plain.is_file():
            shutil.copyfile(plain, dest)
        else:
            raise FileNotFoundError(
                f"{gz} not found. On Debian/Ubuntu: apt-get install -y dataset-fashion-mnist "
                f"(Fashion-MNIST), or pass --source-dir with the four *-ubyte.gz files.")
    return raw


def load_dataset(dataset: str, root: str | Path, download: bool = False) -> dict[str, Tensor]:
    """Whole train and test sets as tensors: x (N, 1, 28, 28) float in [0, 1], y (N,) int64."""
    import torchvision

    cls = getattr(torchvision.datasets, TV_CLASS[dataset])
    out = {}
    for split, train in (("train", True), ("test", False)):
        try:
            ds = cls(str(root), train=train, download=download)
        except RuntimeError as e:
            raise SystemExit(
                f"{e}\nThe {TV_CLASS[dataset]} files are not under {Path(root) / TV_CLASS[dataset] / 'raw'}. "
                "Run: apt-get install -y dataset-fashion-mnist && python examples/cnn.py --prepare-data "
                "(or pass --download where there is internet).") from None
        out[f"x_{split}"] = ds.data.unsqueeze(1).float().div_(255)
        out[f"y_{split}"] = ds.targets.long()
    return out


def synthetic_dataset(n_train: int, n_test: int, seed: int = 0) -> dict[str, Tensor]:
    """A learnable stand-in for the smoke test: 10 random smooth 28×28 class prototypes, each image a
    randomly shifted prototype plus noise, clipped to [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    protos = F.avg_pool2d(torch.rand(10, 1, 28, 28, generator=g), 5, 1, 2)
    protos = (protos - protos.amin((2, 3), keepdim=True)) / (protos.amax((2, 3), keepdim=True)
                                                             - protos.amin((2, 3), keepdim=True))
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        y = torch.randint(0, 10, (n,), generator=g)
        x = protos[y]
        shifts = torch.randint(-2, 3, (n, 2), generator=g)
        x = torch.stack([torch.roll(xi, (int(s[0]), int(s[1])), (1, 2)) for xi, s in zip(x, shifts)])
        out[f"x_{split}"] = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp_(0, 1)
        out[f"y_{split}"] = y
    return out


def get_data(args) -> dict[str, Tensor]:
    if args.quick:
        return synthetic_dataset(args.n_train or 500, args.n_test or 200)
    data = load_dataset(args.dataset, args.data_root, args.download)
    if args.n_train:
        data["x_train"], data["y_train"] = data["x_train"][:args.n_train], data["y_train"][:args.n_train]
    if args.n_test:
        data["x_test"], data["y_test"] = data["x_test"][:args.n_test], data["y_test"][:args.n_test]
    return data


# ------------------------------------------------------------------------------------------ network
class TableOneCNN(nn.Module):
    """Table 1 (MNIST/MNIST-Fashion): compound layers (m, c, k) = conv m×m, c channels, stride 1, same padding;
    [BatchNorm]; leaky-relu 0.2; k×k max-pool (k > 1); [dropout on even-numbered layers]. Then flatten, dense
    layers with leaky-relu ([BatchNorm], [dropout]) and a final dense layer to the logits."""

    def __init__(self, arch=ARCH, dense=DENSE, n_classes: int = 10, in_ch: int = 1, size: int = 28,
                 batchnorm: bool = False, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        for i, (m, c, k) in enumerate(arch, start=1):
            layers.append(nn.Conv2d(in_ch, c, m, stride=1, padding="same"))
            if batchnorm:
                layers.append(nn.BatchNorm2d(c))
            layers.append(nn.LeakyReLU(0.2))
            if k > 1:
                layers.append(nn.MaxPool2d(k, k))
                size //= k
            if dropout > 0 and i % 2 == 0:
                layers.append(nn.Dropout(dropout))
            in_ch = c
        layers.append(nn.Flatten())
        width = in_ch * size * size
        for h in dense:
            layers.append(nn.Linear(width, h))
            if batchnorm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.LeakyReLU(0.2))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, n_classes))
        self.net = nn.Sequential(*layers)

    def he_(self) -> TableOneCNN:
        """He et al. (2015) normal weights for leaky-relu (a = 0.2), zero biases: weight-space training."""
        for mod in self.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(mod.weight, a=0.2, nonlinearity="leaky_relu")
                nn.init.zeros_(mod.bias)
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def build(method: str, data: dict[str, Tensor], args, seed: int) -> tuple[nn.Module, dict]:
    """The model of ``method`` for ``seed``; converted to target space for ``target``."""
    torch.manual_seed(seed)
    model = TableOneCNN(batchnorm=method == "weight_bn", dropout=args.dropout).he_()
    info: dict = {}
    if method == "target":
        g = torch.Generator().manual_seed(10_000 + seed)
        idx = torch.randperm(len(data["x_train"]), generator=g)[:args.nbar]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tp.to_target_space(model, data["x_train"][idx], lam=args.lam, init="random",
                               target_std=args.target_std, max_positions=args.max_positions)
        info["conversion_warnings"] = sorted({str(w.message).split(":")[0] for w in caught})
        info["ref_indices_head"] = idx[:10].tolist()
    info["parameters"] = sum(p.numel() for p in model.parameters())
    return model, info


# ------------------------------------------------------------------------------------------ training
@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch: int = 1000) -> tuple[float, float]:
    """(cross-entropy, accuracy) in eval mode (BatchNorm uses running statistics, dropout off)."""
    was = model.training
    model.eval()
    loss = correct = 0.0
    for i in range(0, len(x), batch):
        logits = model(x[i:i + batch])
        loss += F.cross_entropy(logits, y[i:i + batch], reduction="sum").item()
        correct += (logits.argmax(1) == y[i:i + batch]).sum().item()
    model.train(was)
    return loss / len(x), correct / len(x)


def lr_of(method: str, args) -> float:
    return args.lr_target if method == "target" else args.lr_weight


def _state_path(args, method: str, seed: int, suffix: str) -> Path | None:
    """Where a run's checkpoint (``.pt``) or finished result (``.json``) lives, with ``--resume``."""
    if not getattr(args, "resume", False):
        return None
    return Path(args.out) / "state" / f"{method}-s{seed}{suffix}"


def _save(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # (a kill during the save leaves the previous checkpoint)


def run(method: str, seed: int, args, data: dict[str, Tensor] | None = None, progress: bool = True) -> dict:
    """One training run: ``args.epochs`` epochs (fractions allowed) of Adam on minibatches of ``args.batch``.

    With ``--resume`` the run saves its state (model, optimiser, the shuffling generator, the RNG, the curve so
    far) to ``<out>/state/<method>-s<seed>.pt`` every ``--checkpoint-every`` steps (default: each epoch) and at
    the end, and continues from it when started again; a finished run is read back from its ``.json``."""
    done = _state_path(args, method, seed, ".json")
    if done is not None and done.is_file():
        saved = json.loads(done.read_text())
        if saved["epochs_asked"] == args.epochs:
            print(f"[{method} seed {seed}] finished before: {done}", flush=True)
            return saved
    torch.set_num_threads(args.threads)
    if data is None:
        data = get_data(args)
    model, info = build(method, data, args, seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr_of(method, args))
    x, y = data["x_train"], data["y_train"]
    steps_per_epoch = math.ceil(len(x) / args.batch)
    total = max(1, round(args.epochs * steps_per_epoch))
    g = torch.Generator().manual_seed(20_000 + seed)
    curve = {"step": [], "epoch": [], "train_seconds": [], "test_loss": [], "test_acc": [], "train_loss": []}
    step_seconds: list[float] = []
    running: list[float] = []

    def log(step: int) -> None:
        loss, acc = evaluate(model, data["x_test"], data["y_test"])
        curve["step"].append(step)
        curve["epoch"].append(step / steps_per_epoch)
        curve["train_seconds"].append(sum(step_seconds))
        curve["test_loss"].append(loss)
        curve["test_acc"].append(acc)
        curve["train_loss"].append(statistics.fmean(running) if running else None)
        running.clear()

    wall0 = time.perf_counter()
    bar = tqdm(total=total, desc=f"{method} s{seed}", unit="step", dynamic_ncols=True, file=sys.stdout,
               disable=not progress, mininterval=2.0)
    model.train()
    step, order = 0, None
    ckpt = _state_path(args, method, seed, ".pt")
    every = getattr(args, "checkpoint_every", 0) or steps_per_epoch
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        g.set_state(state["generator"])
        torch.set_rng_state(state["rng"])
        step, order, curve, step_seconds, running = (state[k] for k in ("step", "order", "curve", "step_seconds",
                                                                         "running"))
        bar.update(step)
        print(f"[{method} seed {seed}] resumed at step {step} ({step / steps_per_epoch:.2f} epochs)", flush=True)
    while step < total:
        if ckpt is not None and step % every == 0 and step > 0:
            _save(ckpt, {"model": model.state_dict(), "opt": opt.state_dict(), "generator": g.get_state(),
                         "rng": torch.get_rng_state(), "step": step, "order": order, "curve": curve,
                         "step_seconds": step_seconds, "running": running})
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(x), generator=g)
        if step % args.eval_every == 0:
            log(step)
            bar.set_postfix(test=f"{curve['test_acc'][-1]:.4f}")
            if not progress:
                print(f"[{method} seed {seed}] step {step}/{total} test acc {curve['test_acc'][-1]:.4f} "
                      f"train s {sum(step_seconds):.0f}", flush=True)
        j = step % steps_per_epoch
        idx = order[j * args.batch:(j + 1) * args.batch]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        step_seconds.append(time.perf_counter() - t0)
        running.append(loss.item())
        step += 1
        bar.update(1)
        if not math.isfinite(running[-1]):
            break
    bar.close()
    log(step)
    print(f"[{method} seed {seed}] done: {step} steps, test acc {curve['test_acc'][-1]:.4f}, "
          f"train {sum(step_seconds):.0f} s", flush=True)
    result = {
        "method": method, "seed": seed, "lr": lr_of(method, args), **info, "epochs_asked": args.epochs,
        "steps": step, "epochs": step / steps_per_epoch, "steps_per_epoch": steps_per_epoch,
        "final_test_acc": curve["test_acc"][-1], "final_test_loss": curve["test_loss"][-1],
        "best_test_acc": max(curve["test_acc"]),
        "train_seconds": sum(step_seconds), "wall_seconds": time.perf_counter() - wall0,
        "seconds_per_step_median": statistics.median(step_seconds),
        "curve": curve,
    }
    if done is not None:
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps(result))
    return result


def measure(args, data: dict[str, Tensor], steps: int = 8, warmup: int = 2) -> dict:
    """Median seconds per training step of each method (after ``warmup`` steps), and per epoch."""
    torch.set_num_threads(args.threads)
    out = {}
    for method in args.methods:
        model, _ = build(method, data, args, 0)
        opt = torch.optim.Adam(model.parameters(), lr=lr_of(method, args))
        times = []
        for i in range(warmup + steps):
            idx = torch.randint(0, len(data["x_train"]), (args.batch,))
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(data["x_train"][idx]), data["y_train"][idx]).backward()
            opt.step()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        evaluate(model, data["x_test"], data["y_test"])
        spe = math.ceil(len(data["x_train"]) / args.batch)
        out[method] = {"seconds_per_step_median": statistics.median(times),
                       "seconds_per_epoch_est": statistics.median(times) * spe,
                       "seconds_per_test_eval": time.perf_counter() - t0}
        print(f"{method:10s} {out[method]['seconds_per_step_median'] * 1e3:8.1f} ms/step  "
              f"~{out[method]['seconds_per_epoch_est']:6.0f} s/epoch  eval {out[method]['seconds_per_test_eval']:.1f} s",
              flush=True)
    return out


def _worker(job: tuple[str, int], args) -> dict:
    return run(job[0], job[1], args, progress=False)


# ------------------------------------------------------------------------------------------ summary, plot
def acc_at_seconds(curve: dict, seconds: float) -> float:
    """Test accuracy of one run after ``seconds`` of training, interpolated linearly between its evaluations
    (the final one past its end)."""
    ts, accs = curve["train_seconds"], curve["test_acc"]
    if seconds >= ts[-1]:
        return accs[-1]
    k = next(i for i, t in enumerate(ts) if t >= seconds)
    if k == 0:
        return accs[0]
    w = (seconds - ts[k - 1]) / (ts[k] - ts[k - 1])
    return accs[k - 1] + w * (accs[k] - accs[k - 1])


def summarise(runs: list[dict], methods) -> dict:
    """Per method: final and best test accuracy over the seeds, the mean accuracy at each evaluation epoch
    (``test_acc_by_epoch``), and the mean accuracy at equal training time (``test_acc_at_common_seconds``:
    at the mean training time of the fastest method, ``common_seconds``)."""
    out = {}
    present = [m for m in methods if any(r["method"] == m for r in runs)]
    common = min((statistics.fmean(r["train_seconds"] for r in runs if r["method"] == m) for m in present),
                 default=0.0)
    for m in present:
        rs = [r for r in runs if r["method"] == m]
        accs = [r["final_test_acc"] for r in rs]
        epochs = rs[0]["curve"]["epoch"]
        out[m] = {
            "test_acc_by_epoch": {f"{e:g}": statistics.fmean(r["curve"]["test_acc"][i] for r in rs)
                                  for i, e in enumerate(epochs)},
            "common_seconds": common,
            "test_acc_at_common_seconds": statistics.fmean(acc_at_seconds(r["curve"], common) for r in rs),
            "seeds": len(rs),
            "final_test_acc_mean": statistics.fmean(accs),
            "final_test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "best_test_acc_mean": statistics.fmean(r["best_test_acc"] for r in rs),
            "train_seconds_mean": statistics.fmean(r["train_seconds"] for r in rs),
            "seconds_per_step_median": statistics.median(r["seconds_per_step_median"] for r in rs),
            "epochs": rs[0]["epochs"],
        }
    return out


def plot(runs: list[dict], methods, path: Path, title: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for m in methods:
        for k, r in enumerate(r for r in runs if r["method"] == m):
            c = r["curve"]
            acc = [100 * a for a in c["test_acc"]]
            kw = dict(color=COLOURS[m], alpha=0.85, lw=1.4, ls="-" if k == 0 else "--",
                      label=f"{LABELS[m]}" if k == 0 else None)
            axes[0].plot(c["epoch"], acc, **kw)
            axes[1].plot(c["train_seconds"], acc, **kw)
    for ax, xl in zip(axes, ("epoch", "training wall time (s, evaluation excluded)")):
        ax.set_xlabel(xl)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        # Zoom on the part of the curves after the first tenth of the budget (the JSON has every point).
        late = [100 * a for r in runs for e, a in zip(r["curve"]["epoch"], r["curve"]["test_acc"])
                if e >= 0.1 * r["epochs"]]
        if late:
            ax.set_ylim(max(0, min(late) - 3), min(100, max(late) + 1))
    axes[0].legend(loc="lower right", title="solid/dashed: seeds")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _title(data: str, epochs: float, seeds: int, dropout: float) -> str:
    return (f"{TV_CLASS.get(data, data)}, Table 1 CNN, {epochs:g} epoch(s) each, {seeds} seeds"
            f"{', dropout ' + str(dropout) if dropout else ''}")


# ------------------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=tuple(TV_CLASS), default="fashion", help="Fashion-MNIST or MNIST")
    p.add_argument("--data-root", type=Path, default=Path("data"), help="torchvision root folder")
    p.add_argument("--source-dir", type=Path, default=None,
                   help="folder with the *-ubyte.gz files for --prepare-data (default: the Debian package's)")
    p.add_argument("--prepare-data", action="store_true", help="unpack --source-dir into --data-root and exit")
    p.add_argument("--download", action="store_true", help="let torchvision download the data (needs internet)")
    p.add_argument("--methods", type=str, default=",".join(METHODS), help=f"comma separated, from {METHODS}")
    p.add_argument("--seeds", type=int, default=2, help="trials per method (seeds 0..seeds−1; paper: 2)")
    p.add_argument("--epochs", type=float, default=1.0,
                   help="epochs per run, the same for every method; fractions allowed (paper: 8 GPU hours)")
    p.add_argument("--batch", type=int, default=100, help="minibatch size (paper: 100)")
    p.add_argument("--nbar", type=int, default=100, help="reference batch n̄ of fixed training images (paper: 100)")
    p.add_argument("--lam", type=float, default=0.1, help="ridge λ of eq. 7 (paper: 0.1)")
    p.add_argument("--target-std", type=float, default=0.1, help="σ of the initial targets (paper: 0.1)")
    p.add_argument("--lr-target", type=float, default=0.01, help="Adam lr in target space (paper: 0.01)")
    p.add_argument("--lr-weight", type=float, default=0.001, help="Adam lr in weight space (paper: 0.001)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout probability (paper's second table: 0.2)")
    p.add_argument("--max-positions", type=int, default=None,
                   help="target space solves each conv layer on this many random patch columns (section 4.2; "
                        "default: all, the exact method)")
    p.add_argument("--eval-every", type=int, default=100, help="steps between test-set evaluations")
    p.add_argument("--n-train", type=int, default=0, help="use only the first N training images (0: all)")
    p.add_argument("--n-test", type=int, default=0, help="use only the first N test images (0: all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--workers", type=int, default=1, help="runs in parallel (processes)")
    p.add_argument("--measure", action="store_true", help="print the seconds per step of each method and exit")
    p.add_argument("--plot-only", action="store_true",
                   help="recompute the summary and redraw cnn.png from an existing <--out>/cnn.json")
    p.add_argument("--out", type=Path, default=Path("docs/cnn"), help="output folder")
    p.add_argument("--resume", action="store_true",
                   help="save each run's state under <--out>/state and continue from it when run again")
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="steps between saved states with --resume (0: each epoch)")
    p.add_argument("--quick", action="store_true",
                   help="synthetic data (500 train / 200 test images), 1 epoch (5 steps), n̄ = 100: a smoke test")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = set(args.methods) - set(METHODS)
    if bad:
        p.error(f"unknown methods {sorted(bad)}; choose from {METHODS}")
    if args.quick:
        args.eval_every, args.seeds = 2, 2  # (and the default 1 epoch: 5 steps)
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.prepare_data:
        raw = prepare(args.source_dir or DEBIAN_DIR[args.dataset], args.data_root, args.dataset)
        print(f"unpacked into {raw}")
        load_dataset(args.dataset, args.data_root)  # check that torchvision reads them
        print("torchvision reads them: OK")
        return None
    if args.plot_only:
        saved = json.loads((args.out / "cnn.json").read_text())
        cfg = saved["config"]
        saved["summary"] = summarise(saved["runs"], cfg["methods"])
        (args.out / "cnn.json").write_text(json.dumps(saved, indent=1))
        ep = saved["runs"][0]["epochs"] if saved["runs"] else 0
        plot(saved["runs"], cfg["methods"], args.out / "cnn.png", _title(saved["data"], ep, cfg["seeds"], cfg["dropout"]))
        print(f"recomputed the summary in {args.out / 'cnn.json'} and redrew {args.out / 'cnn.png'}")
        return saved
    data = get_data(args)
    print(f"data: {'synthetic' if args.quick else args.dataset}, train {tuple(data['x_train'].shape)}, "
          f"test {tuple(data['x_test'].shape)}", flush=True)
    timing = measure(args, data, steps=2 if args.quick else 8, warmup=0 if args.quick else 2)
    if args.measure:
        return {"timing": timing}
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [(m, s) for m in args.methods for s in range(args.seeds)]  # a method's seeds run side by side
    t0 = time.perf_counter()
    if args.workers > 1:
        with cf.ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as ex:
            runs = list(ex.map(_worker, jobs, [args] * len(jobs)))
    else:
        runs = [run(m, s, args, data) for m, s in jobs]
    study_seconds = time.perf_counter() - t0
    summary = summarise(runs, args.methods)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = {
        "paper": "Fairbank, Samothrakis and Citi, Deep Learning in Target Space, JMLR 23 (2022), sec. 5.2",
        "config": config, "data": "synthetic" if args.quick else args.dataset,
        "n_train": len(data["x_train"]), "n_test": len(data["x_test"]),
        "timing": timing, "study_wall_seconds": study_seconds,
        "torch": torch.__version__, "device": "cpu", "cpu_count": os.cpu_count(),
        "paper_table2_pct": {m: PAPER_TABLE2[args.dataset][m][1 if args.dropout > 0 else 0] for m in METHODS},
        "summary": summary, "runs": runs,
    }
    (args.out / "cnn.json").write_text(json.dumps(result, indent=1))
    ep = runs[0]["epochs"] if runs else 0
    plot(runs, args.methods, args.out / "cnn.png",
         _title("synthetic" if args.quick else args.dataset, ep, args.seeds, args.dropout))
    print(f"\n{'method':28s} {'final test acc':>18s} {'train s':>9s}  paper")
    for m, s in summary.items():
        print(f"{LABELS[m]:28s} {100 * s['final_test_acc_mean']:8.2f} ± {100 * s['final_test_acc_std']:5.2f} % "
              f"{s['train_seconds_mean']:9.0f}  {result['paper_table2_pct'][m]}%")
    print(f"wrote {args.out / 'cnn.json'} and {args.out / 'cnn.png'} ({study_seconds:.0f} s)")
    return result


if __name__ == "__main__":
    main()
