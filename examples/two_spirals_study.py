"""Two-spirals, the multi-seed study of section 5.1: Figs. 5, 6 and 7 of Fairbank, Samothrakis and Citi (2022).

Builds on ``two_spirals.py`` (data, network, training loop; that script alone gives Fig. 4) and runs every
configuration over several seeds, two single-threaded worker processes at a time:

* Fig. 5: training and test accuracy against epoch, target space (SCU) versus weight space (Glorot), with
  batch gradient descent (plain ``torch.optim.SGD``, lr 10 in target space and 0.1 in weight space, the
  paper's tuned rates) and with Adam (lr 0.01 for both). Full batch, so an epoch is one iteration.
* Fig. 6: SCU versus OCU (``cascade="optimistic"``) versus weight space versus weight space with
  BatchNorm1d after each hidden Linear (before tanh), all Adam lr 0.01.
* Fig. 7: sensitivity of target space (SCU, Adam) to n̄ (a random subset of the 194 training inputs per seed
  is the reference batch; training still uses all 194) at λ = 0.001, and to λ at n̄ = 194.
* A markdown table: epochs to the first 100% training accuracy (median over seeds, unreached counted as
  never, and how many seeds reached it) and the final train/test accuracy (mean ± std).

Everything is full batch on the 194 training points; the test set is the 194 angular midpoints. Outputs, in
``--out``: ``two_spirals_fig5.png``, ``two_spirals_fig6.png``, ``two_spirals_fig7.png``,
``two_spirals_study.json`` (config, every run's curves, the summaries) and ``two_spirals_study.md``.

    python examples/two_spirals_study.py                     # the full study (see --epochs, --epochs-sens)
    python examples/two_spirals_study.py --only fig7 --quick # one part, as a smoke test
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import statistics
import sys
import time
import types
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import target_param as tp  # noqa: E402
import two_spirals as ts  # noqa: E402

NBARS = (8, 12, 17, 24, 48, 97, 194)
LAMS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
QUICK_NBARS, QUICK_LAMS = (8, 17, 194), (1e-5, 1e-3, 1.0)

# A method: which space, optimiser and lr, plus the target-space knobs. Defaults: n̄ = 194, λ = 0.001, SCU.
BASE = {"space": "target", "optimizer": "adam", "lr": 0.01, "cascade": "sequential", "batchnorm": False,
        "nbar": 194, "lam": 1e-3}
METHODS = {
    "gd_target": {"optimizer": "sgd", "lr": 10.0, "label": "target space (SCU), GD lr 10"},
    "gd_weight": {"space": "weight", "optimizer": "sgd", "lr": 0.1, "label": "weight space, GD lr 0.1"},
    "adam_target": {"label": "target space (SCU), Adam 0.01"},
    "adam_ocu": {"cascade": "optimistic", "label": "target space (OCU), Adam 0.01"},
    "adam_weight": {"space": "weight", "label": "weight space, Adam 0.01"},
    "adam_weight_bn": {"space": "weight", "batchnorm": True, "label": "weight space + BatchNorm, Adam 0.01"},
}
FIGS = {"fig5": ("gd_target", "gd_weight", "adam_target", "adam_weight"),
        "fig6": ("adam_target", "adam_ocu", "adam_weight", "adam_weight_bn")}
COLOURS = {"gd_target": "tab:blue", "gd_weight": "tab:red", "adam_target": "tab:blue", "adam_weight": "tab:red",
           "adam_ocu": "tab:green", "adam_weight_bn": "tab:orange"}


def spec(name: str) -> dict:
    if name in METHODS:
        return {**BASE, **METHODS[name]}
    kind, value = name.split("=")  # "nbar=17" or "lam=0.0001" (Fig. 7)
    v = int(value) if kind == "nbar" else float(value)
    return {**BASE, kind: v, "label": f"target space (SCU), Adam, {'n̄' if kind == 'nbar' else 'λ'} = {value}"}


# ------------------------------------------------------------------------------------------ one run
def run_one(job: tuple[str, int, int, int]) -> dict:
    """Train one (method, seed) for ``epochs`` full-batch iterations in a fresh single-threaded process."""
    name, seed, epochs, eval_every = job
    s = spec(name)
    torch.set_num_threads(1)
    raw = ts.two_spirals(torch.float32)
    data = {k: v for k, v in raw.items()}
    data["x_train"], data["x_test"] = raw["x_train"] / ts.SPIRAL_RADIUS, raw["x_test"] / ts.SPIRAL_RADIUS
    args = types.SimpleNamespace(iters=epochs, eval_every=eval_every)
    out = {"method": name, "seed": seed, "epochs": epochs, **{k: v for k, v in s.items() if k != "label"}}
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.manual_seed(seed)
            model = ts.TwoSpiralsNet(batchnorm=s["batchnorm"])
            if s["space"] == "target":
                ref = data["x_train"]
                if s["nbar"] < len(ref):  # a random subset of the training inputs, fixed for the run
                    g = torch.Generator().manual_seed(10_000 + seed)
                    ref = ref[torch.randperm(len(ref), generator=g)[: s["nbar"]].sort().values]
                tp.to_target_space(model, ref, lam=s["lam"], init="random", target_std=1.0, cascade=s["cascade"])
            else:
                model.glorot_()
            res = ts.train(s["space"], model, data, args, torch.device("cpu"), lr=s["lr"],
                           optimizer=s["optimizer"], progress=False)
        out["warnings"] = sorted({str(w.message).split(" (")[0] for w in caught})
        out.update({k: res[k] for k in ("final_train_acc", "final_test_acc", "final_train_loss", "final_test_loss",
                                         "first_100pct_train_iter", "seconds_per_iter_median")})
        out["curve"] = {k: res["curve"][k] for k in ("iter", "train_acc", "test_acc", "train_loss")}
        out["error"] = None
    except Exception as e:  # e.g. a failed solve at tiny λ (the paper: "numerical errors" at λ ≤ 1e-4)
        out.update(error=f"{type(e).__name__}: {str(e)[:300]}", final_train_acc=None, final_test_acc=None,
                   first_100pct_train_iter=None, curve=None)
    out["wall_seconds"] = time.perf_counter() - t0
    return out


# ------------------------------------------------------------------------------------------ summaries
def summarise(runs: list[dict], epochs: int) -> dict:
    ok = [r for r in runs if r["error"] is None]
    firsts = [r["first_100pct_train_iter"] for r in runs]
    reached = sorted(f for f in firsts if f is not None)
    # median over all seeds; an unreached seed counts as "never" (+inf)
    med = statistics.median([math.inf if f is None else f for f in firsts]) if firsts else math.inf

    def ms(key):
        v = [r[key] for r in ok if r[key] is not None and math.isfinite(r[key])]
        return (statistics.fmean(v) if v else None, statistics.pstdev(v) if len(v) > 1 else 0.0 if v else None)

    return {"seeds": len(runs), "errors": len(runs) - len(ok), "reached_100pct": len(reached),
            "median_epochs_to_100pct": None if math.isinf(med) else med, "epochs_budget": epochs,
            "epochs_to_100pct_each": firsts,
            "final_train_acc_mean_std": ms("final_train_acc"), "final_test_acc_mean_std": ms("final_test_acc")}


def band(runs: list[dict], key: str):
    ok = [r["curve"] for r in runs if r["error"] is None]
    if not ok:
        return None
    x = torch.tensor(ok[0]["iter"], dtype=torch.float64)
    y = torch.tensor([c[key] for c in ok], dtype=torch.float64)
    return x, y.mean(0), y.min(0).values, y.max(0).values


def table(summaries: dict[str, dict], order: list[str]) -> str:
    lines = ["| method | seeds | reached 100% train | median epochs to 100% train | final train acc | "
             "final test acc |", "|---|---|---|---|---|---|"]
    for name in order:
        s = summaries[name]
        med = s["median_epochs_to_100pct"]
        med = f"> {s['epochs_budget']}" if med is None else f"{med:g}"
        tr, te = s["final_train_acc_mean_std"], s["final_test_acc_mean_std"]
        fmt = (lambda m: "n/a" if m[0] is None else f"{100 * m[0]:.1f} ± {100 * m[1]:.1f}%")
        err = f" ({s['errors']} failed)" if s["errors"] else ""
        lines.append(f"| {spec(name)['label']} | {s['seeds']}{err} | {s['reached_100pct']}/{s['seeds']} | {med} | "
                     f"{fmt(tr)} | {fmt(te)} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ plots
def curve_panel(ax, by_method, names, title, keys=("train_acc", "test_acc")):
    for name in names:
        for key, ls in (("train_acc", "-"), ("test_acc", "--")):
            if key not in keys:
                continue
            b = band(by_method[name], key)
            if b is None:
                continue
            x, mean, lo, hi = b
            lbl = f"{spec(name)['label']} ({'train' if key == 'train_acc' else 'test'})"
            ax.plot(x, mean, ls, color=COLOURS[name], lw=1.4, label=lbl)
            ax.fill_between(x, lo, hi, color=COLOURS[name], alpha=0.12 if key == "train_acc" else 0.07, lw=0)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("epoch (= full-batch iteration)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0.4, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")


def plot_fig5(by_method, out: Path, seeds: int) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    curve_panel(axes[0], by_method, ("gd_target", "gd_weight"), "Batch gradient descent")
    curve_panel(axes[1], by_method, ("adam_target", "adam_weight"), "Adam, lr 0.01")
    fig.suptitle(f"Fig. 5: two-spirals, 2-5-5-5-2 with all shortcuts; mean over {seeds} seeds, band = min–max; "
                 "solid = train, dashed = test", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    path = out / "two_spirals_fig5.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_fig6(by_method, out: Path, seeds: int) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    names = FIGS["fig6"]
    curve_panel(axes[0], by_method, names, "Training accuracy", keys=("train_acc",))
    curve_panel(axes[1], by_method, names, "Test accuracy", keys=("test_acc",))
    fig.suptitle(f"Fig. 6: SCU vs OCU vs weight space vs weight space + BatchNorm, Adam lr 0.01; "
                 f"mean over {seeds} seeds, band = min–max", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    path = out / "two_spirals_fig6.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_fig7(by_method, nbars, lams, out: Path, seeds: int, epochs: int) -> Path:
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5), sharex="col")
    for col, (kind, values) in enumerate((("nbar", nbars), ("lam", lams))):
        names = [f"{kind}={v:g}" for v in values]
        for key, colour, lbl in (("final_train_acc", "tab:blue", "train"), ("final_test_acc", "tab:red", "test")):
            ax = axes[0][col]
            xs, means = [], []
            for v, n in zip(values, names):
                accs = [r[key] for r in by_method[n] if r[key] is not None]
                ax.scatter([v] * len(accs), accs, s=14, color=colour, alpha=0.5)
                if accs:
                    xs.append(v)
                    means.append(statistics.fmean(accs))
                fails = sum(r["error"] is not None for r in by_method[n])
                if fails and key == "final_train_acc":
                    ax.annotate(f"{fails} failed", (v, 0.45), fontsize=7, ha="center")
            ax.plot(xs, means, "-o", color=colour, label=f"final {lbl} accuracy (mean; dots = seeds)")
        ax = axes[1][col]
        for v, n in zip(values, names):
            f = [r["first_100pct_train_iter"] for r in by_method[n]]
            reached = [x for x in f if x is not None]
            ax.scatter([v] * len(reached), reached, s=18, color="tab:green")
            if len(reached) < len(f):
                ax.scatter([v], [epochs * 1.05], marker="^", color="k", s=25)
                ax.annotate(f"{len(f) - len(reached)} never", (v, epochs * 1.08), fontsize=7, ha="center")
        ax.axhline(epochs, color="0.6", ls=":", lw=1)
        ax.set_ylabel("epochs to 100% train (▲ = not in budget)")
        ax.set_ylim(0, epochs * 1.15)
        for a in axes[:, col]:
            a.set_xscale("log")
            a.grid(alpha=0.3)
        if kind == "nbar":
            for a in axes[:, col]:
                a.axvline(17.5, color="0.5", ls="--", lw=1)
            axes[0][col].set_title("reference batch size n̄ (λ = 0.001); dashed: last layer d_in + 1 = 18", fontsize=10)
            axes[1][col].set_xlabel("n̄")
            axes[1][col].set_xticks(list(values), [str(v) for v in values])
        else:
            axes[0][col].set_title("ridge λ (n̄ = 194)", fontsize=10)
            axes[1][col].set_xlabel("λ")
        axes[0][col].set_ylabel("accuracy")
        axes[0][col].set_ylim(0.4, 1.02)
        axes[0][col].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Fig. 7: target-space (SCU, Adam 0.01) sensitivity, {epochs} epochs, {seeds} seeds", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    path = out / "two_spirals_fig7.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--only", type=str, default="fig5,fig6,fig7", help="comma-separated parts to run")
    p.add_argument("--epochs", type=int, default=2500, help="budget for Figs. 5 and 6")
    p.add_argument("--epochs-sens", type=int, default=1500, help="budget for Fig. 7")
    p.add_argument("--seeds", type=int, default=5, help="seeds per method in Figs. 5 and 6")
    p.add_argument("--seeds-sens", type=int, default=3, help="seeds per setting in Fig. 7")
    p.add_argument("--eval-every", type=int, default=25, help="epochs between logged evaluations")
    p.add_argument("--workers", type=int, default=2, help="processes, one torch thread each")
    p.add_argument("--out", type=Path, default=Path("out/two_spirals"), help="output folder")
    p.add_argument("--quick", action="store_true",
                   help="100/50 epochs, 2/1 seeds, n̄ ∈ {8, 17, 194}, λ ∈ {1e-5, 1e-3, 1}: a smoke test")
    args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    if not set(args.only) <= {"fig5", "fig6", "fig7"} or not args.only:
        p.error("--only takes fig5, fig6 and/or fig7")
    args.nbars, args.lams = NBARS, LAMS
    if args.quick:
        args.epochs, args.epochs_sens = min(args.epochs, 100), min(args.epochs_sens, 50)
        args.seeds, args.seeds_sens = min(args.seeds, 2), min(args.seeds_sens, 1)
        args.eval_every = min(args.eval_every, 10)
        args.nbars, args.lams = QUICK_NBARS, QUICK_LAMS
    if min(args.epochs, args.epochs_sens, args.seeds, args.seeds_sens, args.eval_every, args.workers) < 1:
        p.error("epochs, seeds, --eval-every and --workers must be ≥ 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    # Jobs, deduplicated: Fig. 6 reuses Fig. 5's Adam runs, and n̄ = 194 is λ = 0.001 in Fig. 7.
    groups: dict[str, tuple[int, int]] = {}  # method -> (epochs, seeds)
    for fig in ("fig5", "fig6"):
        if fig in args.only:
            for m in FIGS[fig]:
                groups[m] = (args.epochs, args.seeds)
    sens = []
    if "fig7" in args.only:
        sens = [f"nbar={n}" for n in args.nbars] + [f"lam={lam:g}" for lam in args.lams]
        for n in sens:
            groups[n] = (args.epochs_sens, args.seeds_sens)
    canon = {n: ("nbar=194" if n == "lam=0.001" and "nbar=194" in groups else n) for n in groups}
    jobs = sorted({(canon[n], seed, e, args.eval_every) for n, (e, k) in groups.items() for seed in range(k)},
                  key=lambda j: (-(j[2] * (5 if spec(j[0])["space"] == "target" else 1)), j))
    print(f"two-spirals study: {', '.join(args.only)}; {len(jobs)} runs on {args.workers} processes; "
          f"Figs. 5-6: {args.epochs} epochs × {args.seeds} seeds, Fig. 7: {args.epochs_sens} epochs × "
          f"{args.seeds_sens} seeds", flush=True)
    results = []
    with mp.get_context("spawn").Pool(args.workers) as pool:
        for k, r in enumerate(pool.imap_unordered(run_one, jobs), 1):
            results.append(r)
            status = r["error"] or (f"train {r['final_train_acc']:.3f} test {r['final_test_acc']:.3f} "
                                    f"100% at {r['first_100pct_train_iter']}")
            print(f"[{k:3d}/{len(jobs)} {time.perf_counter() - t_start:7.1f}s] {r['method']:16} seed {r['seed']}: "
                  f"{status} ({r['wall_seconds']:.1f}s)", flush=True)
    by_run = {(r["method"], r["seed"]): r for r in results}
    by_method = {n: [by_run[(canon[n], s)] for s in range(k)] for n, (e, k) in groups.items()}
    summaries = {n: summarise(runs, groups[n][0]) for n, runs in by_method.items()}

    args.out.mkdir(parents=True, exist_ok=True)
    pngs = []
    if "fig5" in args.only:
        pngs.append(plot_fig5(by_method, args.out, args.seeds))
    if "fig6" in args.only:
        pngs.append(plot_fig6(by_method, args.out, args.seeds))
    if "fig7" in args.only:
        pngs.append(plot_fig7(by_method, args.nbars, args.lams, args.out,
                              args.seeds_sens, args.epochs_sens))
    main_names = [m for m in METHODS if m in groups]
    md = ["# Two-spirals study (Fairbank, Samothrakis, Citi 2022, section 5.1, Figs. 5-7)", "",
          "Full batch (194 training points; test = 194 angular midpoints), 2-5-5-5-2 tanh with all shortcuts. "
          "Epochs to 100% = first epoch whose training forward pass classifies every training point; the median is "
          "over all seeds with unreached seeds counted as never (\"> budget\" when over half never reached it). "
          "Final accuracies: after the last epoch, mean ± std (population) over seeds.", ""]
    if main_names:
        md += [f"## Figs. 5-6: {args.epochs} epochs, {args.seeds} seeds", "", table(summaries, main_names), ""]
    if sens:
        md += [f"## Fig. 7: target space (SCU, Adam 0.01), {args.epochs_sens} epochs, {args.seeds_sens} seeds; "
               "n̄ sweep at λ = 0.001, λ sweep at n̄ = 194", "", table(summaries, sens), ""]
    md += [f"Wall time {time.perf_counter() - t_start:.0f} s on {args.workers} single-threaded processes.", ""]
    md_text = "\n".join(md)
    summary = {
        "paper": "Fairbank, Samothrakis, Citi, Deep Learning in Target Space, JMLR 2022, section 5.1, Figs. 5-7",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "methods": {n: {k: v for k, v in spec(n).items()} for n in groups},
        "summary": summaries,
        "runs": sorted(results, key=lambda r: (r["method"], r["seed"])),
        "wall_seconds": time.perf_counter() - t_start,
        "torch": torch.__version__,
    }
    js, mdp = args.out / "two_spirals_study.json", args.out / "two_spirals_study.md"
    js.write_text(json.dumps(summary, indent=None))
    mdp.write_text(md_text)
    print("\n" + md_text)
    print("wrote " + ", ".join(str(p) for p in [*pngs, js, mdp]))
    return summary


if __name__ == "__main__":
    main()
