"""A timm model trained on Fashion-MNIST in target space, next to its weight-space twin.

Shows that a model from an ordinary model zoo goes to target space with one call (Fairbank, Samothrakis and
Citi, "Deep Learning in Target Space", JMLR 23 (2022); the CNN settings of section 5.2 carried over to a
residual network, which the paper did not test):

    model = timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=10)
    tp.to_target_space(model, ref_batch, lam=0.1, init="random", target_std=0.1)   # the one call
    # ... the same training loop as in weight space

* Model: ``timm.create_model(--model, pretrained=False, in_chans=1, num_classes=10)``. For 28×28 inputs a
  ResNet-style stem (``conv1`` 7×7 stride 2) is replaced by a 3×3 stride-1 convolution, keeping the max-pool,
  so the residual stages see 14, 7, 4 and 2 pixels (``--no-adapt`` keeps timm's stem). BatchNorm layers stay
  in both twins; in target space they are realised in the reference pass with frozen running statistics.
* Data: Fashion-MNIST as in ``examples/cnn.py`` (same ``--data-root`` / ``--prepare-data`` files, never
  downloaded unless ``--download``); ``--quick`` uses synthetic images instead.
* Both twins start from the same timm initialisation (same seed), train for the same number of Adam steps on
  the same minibatches of ``--batch``: target space with lr 0.01, n̄ = ``--nbar`` fixed training images,
  λ = 0.1, targets σ = 0.1 then projected (``init="random"``); weight space with lr 0.001 (the paper's CNN
  values). Test accuracy is evaluated every ``--eval-every`` steps on the first ``--n-test`` test images
  (untimed); the training wall time is recorded.

It writes ``timm_<model>.json`` (configuration, curves, wall times) and ``timm_<model>.png`` (test accuracy
against step and against training wall time) to ``--out``.

    python examples/timm_finetune.py --steps 60                 # a short CPU budget
    python examples/timm_finetune.py --model convnext_atto      # another timm model
    python examples/timm_finetune.py --quick                    # synthetic data, < 1 minute: a smoke test
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

import target_param as tp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cnn import evaluate, load_dataset, synthetic_dataset  # noqa: E402

LABELS = {"target": "Target space", "weight": "Weight space"}
COLOURS = {"target": "tab:red", "weight": "tab:blue"}


def create(name: str, seed: int, adapt: bool = True) -> nn.Module:
    """A fresh timm model for 1-channel 28×28 images and 10 classes; a strided ResNet stem made 3×3 stride 1."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, in_chans=1, num_classes=10)
    conv1 = getattr(model, "conv1", None)
    if adapt and isinstance(conv1, nn.Conv2d) and conv1.stride[0] > 1:
        model.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, 1, 1, bias=conv1.bias is not None)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


def train(method: str, data, args) -> dict:
    model = create(args.model, args.seed, not args.no_adapt)
    info = {}
    if method == "target":
        g = torch.Generator().manual_seed(10_000 + args.seed)
        ref = data["x_train"][torch.randperm(len(data["x_train"]), generator=g)[:args.nbar]]
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tp.to_target_space(model, ref, lam=args.lam, init="random", target_std=args.target_std)
        info["conversion_seconds"] = time.perf_counter() - t0
        info["rank_deficient_layers"] = sum(isinstance(w.message, tp.RankDeficientWarning) for w in caught)
    lr = args.lr_target if method == "target" else args.lr_weight
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = data["x_train"], data["y_train"]
    g = torch.Generator().manual_seed(20_000 + args.seed)  # the same minibatches for both twins
    curve = {"step": [], "train_seconds": [], "test_acc": [], "test_loss": []}
    secs: list[float] = []

    def log(step):
        loss, acc = evaluate(model, data["x_test"], data["y_test"], batch=250)
        curve["step"].append(step)
        curve["train_seconds"].append(sum(secs))
        curve["test_acc"].append(acc)
        curve["test_loss"].append(loss)

    model.train()
    bar = tqdm(range(args.steps), desc=f"{args.model} {method}", unit="step", dynamic_ncols=True, file=sys.stdout)
    for step in bar:
        if step % args.eval_every == 0:
            log(step)
            bar.set_postfix(test=f"{curve['test_acc'][-1]:.3f}")
        idx = torch.randint(0, len(x), (args.batch,), generator=g)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        secs.append(time.perf_counter() - t0)
    bar.close()
    log(args.steps)
    if method == "target":
        with torch.no_grad():
            model.eval()
            before = model(data["x_test"][:50])
            tp.to_weight_space(model)
            info["back_to_weight_space_max_abs_logit_change"] = (model(data["x_test"][:50]) - before).abs().max().item()
    return {"method": method, "lr": lr, **info, "final_test_acc": curve["test_acc"][-1],
            "train_seconds": sum(secs), "seconds_per_step_median": statistics.median(secs), "curve": curve}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="resnet18", help="any timm model name (pretrained=False)")
    p.add_argument("--no-adapt", action="store_true", help="keep timm's strided stem")
    p.add_argument("--dataset", choices=("fashion", "mnist"), default="fashion")
    p.add_argument("--data-root", type=Path, default=Path("data"), help="torchvision root (see examples/cnn.py)")
    p.add_argument("--download", action="store_true", help="let torchvision download the data (needs internet)")
    p.add_argument("--steps", type=int, default=60, help="Adam steps per twin (the same for both)")
    p.add_argument("--batch", type=int, default=100, help="minibatch size (paper: 100)")
    p.add_argument("--nbar", type=int, default=100, help="reference batch n̄ (paper: 100)")
    p.add_argument("--lam", type=float, default=0.1, help="ridge λ (paper: 0.1)")
    p.add_argument("--target-std", type=float, default=0.1, help="σ of the initial targets (paper, CNNs: 0.1)")
    p.add_argument("--lr-target", type=float, default=0.01, help="Adam lr in target space (paper: 0.01)")
    p.add_argument("--lr-weight", type=float, default=0.001, help="Adam lr in weight space (paper: 0.001)")
    p.add_argument("--eval-every", type=int, default=10, help="steps between test evaluations")
    p.add_argument("--n-test", type=int, default=2000, help="first N test images used for evaluation (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", type=Path, default=Path("docs/timm"), help="output folder")
    p.add_argument("--quick", action="store_true",
                   help="synthetic data (200 train / 100 test), batch 20, n̄ = 20, 4 steps: a smoke test")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.batch, args.nbar, args.eval_every, args.n_test = 4, 20, 20, 2, 100
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        data = synthetic_dataset(200, args.n_test)
    else:
        data = load_dataset(args.dataset, args.data_root, args.download)
        if args.n_test:
            data["x_test"], data["y_test"] = data["x_test"][:args.n_test], data["y_test"][:args.n_test]
    runs = {m: train(m, data, args) for m in ("target", "weight")}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"timm_{args.model}"
    result = {"paper": "Fairbank, Samothrakis and Citi, Deep Learning in Target Space, JMLR 23 (2022)",
              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "data": "synthetic" if args.quick else args.dataset, "n_test": len(data["x_test"]),
              "torch": torch.__version__, "runs": runs}
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for m, r in runs.items():
        acc = [100 * a for a in r["curve"]["test_acc"]]
        axes[0].plot(r["curve"]["step"], acc, "o-", color=COLOURS[m], ms=3, label=f"{LABELS[m]} (lr {r['lr']:g})")
        axes[1].plot(r["curve"]["train_seconds"], acc, "o-", color=COLOURS[m], ms=3)
    for ax, xl in zip(axes, ("Adam step (minibatch of %d)" % args.batch, "training wall time (s)")):
        ax.set_xlabel(xl)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right")
    fig.suptitle(f"timm {args.model}, {'synthetic' if args.quick else args.dataset}, {args.steps} steps")
    fig.tight_layout()
    fig.savefig(args.out / f"{stem}.png", dpi=120)
    plt.close(fig)
    for m, r in runs.items():
        print(f"{LABELS[m]:14s} final test acc {100 * r['final_test_acc']:6.2f} %  train {r['train_seconds']:6.1f} s "
              f"({1e3 * r['seconds_per_step_median']:.0f} ms/step)")
    print(f"wrote {args.out / (stem + '.json')} and {args.out / (stem + '.png')}")
    return result


if __name__ == "__main__":
    main()
