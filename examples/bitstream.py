"""Bit-stream memorisation and addition with a recurrent network, in target space versus weight space.

Reproduces the bit-stream experiments of Fairbank, Samothrakis and Citi, "Deep Learning in Target Space",
JMLR 23 (2022), section 5.3, Fig. 8 (memorise) and Fig. 9 (add).

* Tasks. A stream of random bits x(0), x(1), ... arrives one bit per time step (input 0 or 1).
  - ``memorise`` (Fig. 8): the output at step t is the bit seen N steps earlier, x(t − N). With N = 2 the
    stream 1,1,1,1,0,1 gives -,-,1,1,1,1.
  - ``add`` (Fig. 9): the output is the little-endian binary sum of the stream and its N-delayed self,
    s(t) = x(t) + x(t − N) + c(t), output s(t) mod 2, carry c(t + 1) = s(t) div 2, c(N) = 0. With N = 2 the
    stream 1,0,1,1,0,1 gives -,-,0,0,0,1 (1101 + 1011 = 0001, the final carry cut off).
  The first N outputs are undefined: the loss and the accuracy ignore them.
* Network: 1-H-2, one fully recurrent tanh layer (``nn.RNN``, batch_first) of H = N + 3 nodes (N + 5 for
  addition) and a linear exit to 2 logits, softmax + cross-entropy. The LSTM comparison replaces the
  recurrent layer by an ``nn.LSTM`` with H memory cells.
* Data: 8,000 training streams of length N + 50, random minibatches of 100 (reshuffled every epoch), and a
  fresh test set (``--n-test`` streams, 1,000 by default; the paper does not give its size).
* Target space (``target_scu``, ``target_ocu``): the reference batch is 100 fixed training streams (n̄ = 100,
  n̄_t = N + 50), λ = 0.1, targets truncated normal with σ = 1 and then projected (eq. 13,
  ``init="random"``); Algorithm 5 with sequential (SCU) or optimistic (OCU) cascade untangling.
* Weight space (``weight``): Glorot (Xavier) uniform weights, zero biases. ``lstm``: weight space with the
  Keras LSTM defaults (Glorot uniform input kernel, orthogonal recurrent kernel, zero biases with the forget
  gate's bias at 1).
* All methods: Adam, learning rate 0.001. A run is a success when the test accuracy reaches 99% at any
  evaluation (every ``--eval-every`` iterations, and after the last one); the iteration count of the first
  such evaluation is its iterations to success. The paper trains 50,000 iterations; a run stops at success
  unless ``--no-early-stop``.

For every task it writes ``bitstream_<task>.json`` (the configuration and, per N, method and seed: success,
iterations to success, final and best test accuracy, wall time) and ``bitstream_<task>.png`` (success ratio
and mean iterations to success against N per method, like Fig. 8 and 9) to ``--out``. The JSON is rewritten
after every run, so an interrupted sweep keeps what it finished; ``--resume`` continues it, running only the
missing (N, method, seed) points, and ``--stop-after-fail`` skips a method beyond the first N at which it
failed on every seed.

    python examples/bitstream.py                         # the paper's settings (very long on a CPU)
    python examples/bitstream.py --task add --N 2,4,8 --iters 5000 --seeds 3
    python examples/bitstream.py --quick                 # a smoke test (N = 2, 3; 100 iterations)
    python examples/bitstream.py --task memorise --N 8,16,24,32,40,48,56,64 --iters 10000 --seeds 3 \
        --resume --stop-after-fail --out docs/bitstream/long   # resumable: rerun the same line to continue
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

TASKS = ("memorise", "add")
METHODS = ("target_scu", "target_ocu", "weight", "lstm")
LABELS = {"target_scu": "Target space (SCU)", "target_ocu": "Target space (OCU)",
          "weight": "Weight space", "lstm": "Weight space, LSTM"}
STYLES = {"target_scu": ("tab:red", "o"), "target_ocu": ("tab:orange", "s"),
          "weight": ("tab:blue", "^"), "lstm": ("tab:green", "D")}
SUCCESS_ACCURACY = 0.99


# ------------------------------------------------------------------------------------------ data
def targets_for(task: str, bits: Tensor, delay: int) -> Tensor:
    """The target bit at every step of every stream (B, L), int64; the first ``delay`` entries are −1."""
    bits = bits.long()
    y = torch.full_like(bits, -1)
    if task == "memorise":
        y[:, delay:] = bits[:, :-delay] if delay > 0 else bits
        return y
    carry = torch.zeros_like(bits[:, 0])
    for t in range(delay, bits.shape[1]):
        s = bits[:, t] + bits[:, t - delay] + carry
        y[:, t], carry = s % 2, s // 2
    return y


def make_data(task: str, delay: int, n_train: int, n_test: int, length: int, seed: int) -> dict[str, Tensor]:
    """Random bit streams (B, L, 1) as float 0/1 inputs and their target bits (B, L)."""
    g = torch.Generator().manual_seed(1_000_003 * seed + 7919 * delay + TASKS.index(task))
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        bits = torch.randint(0, 2, (n, length), generator=g)
        out[f"x_{split}"] = bits.float().unsqueeze(-1)
        out[f"y_{split}"] = targets_for(task, bits, delay)
    return out


# ------------------------------------------------------------------------------------------ networks
class BitNet(nn.Module):
    """1-H-2: one recurrent layer (tanh RNN or LSTM) and a linear exit giving 2 logits per time step."""

    def __init__(self, hidden: int, cell: str = "rnn"):
        super().__init__()
        if cell == "rnn":
            self.rec = nn.RNN(1, hidden, nonlinearity="tanh", batch_first=True)
        else:
            self.rec = nn.LSTM(1, hidden, batch_first=True)
        self.out = nn.Linear(hidden, 2)

    def glorot_(self) -> BitNet:
        """Glorot uniform weights and zero biases; for the LSTM the Keras defaults (see the docstring)."""
        for name, p in self.rec.named_parameters():
            if name.startswith("bias"):
                nn.init.zeros_(p)
            elif isinstance(self.rec, nn.LSTM) and name.startswith("weight_hh"):
                for gate in p.detach().chunk(4, 0):  # orthogonal per gate, like Keras' recurrent kernel
                    nn.init.orthogonal_(gate)
            else:
                nn.init.xavier_uniform_(p)
        if isinstance(self.rec, nn.LSTM):  # unit forget bias (gate order i, f, g, o)
            h = self.rec.hidden_size
            with torch.no_grad():
                self.rec.bias_ih_l0[h:2 * h].fill_(1.0)
        nn.init.xavier_uniform_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        return self

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.rec(x)
        return self.out(h)  # (B, L, 2)


def build(method: str, hidden: int, ref: Tensor, args) -> nn.Module:
    model = BitNet(hidden, "lstm" if method == "lstm" else "rnn")
    if method.startswith("target"):
        tp.to_target_space(model, ref, lam=args.lam, init="random", target_std=args.target_std,
                           cascade="sequential" if method == "target_scu" else "optimistic")
    else:
        model.glorot_()
    return model


# ------------------------------------------------------------------------------------------ training
def masked_loss(logits: Tensor, y: Tensor, delay: int) -> Tensor:
    return F.cross_entropy(logits[:, delay:].reshape(-1, 2), y[:, delay:].reshape(-1))


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, delay: int, chunk: int = 500) -> float:
    """The fraction of correct output bits after the first ``delay`` steps."""
    correct = 0
    for i in range(0, len(x), chunk):
        pred = model(x[i:i + chunk])[:, delay:].argmax(-1)
        correct += (pred == y[i:i + chunk, delay:]).sum().item()
    return correct / y[:, delay:].numel()


def run_one(task: str, delay: int, method: str, seed: int, args) -> dict:
    length = delay + args.extra_length
    hidden = delay + (args.spare_memorise if task == "memorise" else args.spare_add)
    data = make_data(task, delay, args.n_train, args.n_test, length, seed)
    x, y = data["x_train"], data["y_train"]
    torch.manual_seed(seed)
    t_start = time.perf_counter()
    model = build(method, hidden, x[:args.n_ref], args)  # the reference batch: n̄ fixed training streams
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    order = torch.randperm(len(x))
    pos, step_seconds, curve = 0, [], {"iter": [], "test_acc": []}
    success_iter, it, nonfinite = None, 0, False

    def evaluate(at: int) -> float:
        acc = accuracy(model, data["x_test"], data["y_test"], delay)
        curve["iter"].append(at)
        curve["test_acc"].append(acc)
        return acc

    while True:
        if it % args.eval_every == 0 or it == args.iters:
            if evaluate(it) >= SUCCESS_ACCURACY and success_iter is None:
                success_iter = it
                if not args.no_early_stop:
                    break
        if it == args.iters:
            break
        if pos + args.batch > len(x):
            order, pos = torch.randperm(len(x)), 0
        idx = order[pos:pos + args.batch]
        pos += args.batch
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = masked_loss(model(x[idx]), y[idx], delay)
        loss.backward()
        opt.step()
        step_seconds.append(time.perf_counter() - t0)
        it += 1
        if not math.isfinite(loss.item()):
            nonfinite = True
            evaluate(it)
            break
    return {
        "task": task, "N": delay, "method": method, "seed": seed, "hidden": hidden, "length": length,
        "success": success_iter is not None,
        "iters_to_success": success_iter,
        "iters_run": it,
        "final_test_acc": curve["test_acc"][-1],
        "best_test_acc": max(curve["test_acc"]),
        "nonfinite_loss": nonfinite,
        "wall_seconds": time.perf_counter() - t_start,
        "seconds_per_iter_median": statistics.median(step_seconds) if step_seconds else None,
        "curve": curve,
    }


# ------------------------------------------------------------------------------------------ summary, plot
def summarise(runs: list[dict], task: str, delays: list[int], methods: list[str]) -> dict:
    table = {}
    for m in methods:
        for n in delays:
            rs = [r for r in runs if r["task"] == task and r["method"] == m and r["N"] == n]
            if not rs:
                continue
            ok = [r["iters_to_success"] for r in rs if r["success"]]
            table.setdefault(m, {})[str(n)] = {
                "trials": len(rs), "successes": len(ok), "success_ratio": len(ok) / len(rs),
                "mean_iters_to_success": statistics.fmean(ok) if ok else None,
                "mean_final_test_acc": statistics.fmean(r["final_test_acc"] for r in rs),
                "mean_seconds_per_iter": statistics.fmean(r["seconds_per_iter_median"] for r in rs
                                                          if r["seconds_per_iter_median"] is not None)
                if any(r["seconds_per_iter_median"] is not None for r in rs) else None,
            }
    return table


def plot(table: dict, task: str, args, path: Path) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    all_ns = sorted({int(n) for per_n in table.values() for n in per_n})
    step = min((b - a for a, b in zip(all_ns, all_ns[1:])), default=1)
    for i, (m, per_n) in enumerate(table.items()):
        colour, marker = STYLES[m]
        ns = sorted(int(n) for n in per_n)
        dx = (i - (len(table) - 1) / 2) * 0.04 * step  # a small sideways offset, so equal points stay visible
        ax1.plot([n + dx for n in ns], [per_n[str(n)]["success_ratio"] for n in ns], marker=marker, color=colour,
                 label=LABELS[m], alpha=0.85)
        pts = [(n + dx, per_n[str(n)]["mean_iters_to_success"]) for n in ns
               if per_n[str(n)]["mean_iters_to_success"] is not None]
        if pts:
            ax2.plot(*zip(*pts), marker=marker, color=colour, label=LABELS[m], alpha=0.85)
    ax1.set_xlabel("delay length N")
    ax1.set_ylabel("ratio of successful trials")
    ax1.set_ylim(-0.05, 1.05)
    ax1.set_title("Success ratio (test accuracy ≥ 99%)")
    ax2.set_xlabel("delay length N")
    ax2.set_ylabel("mean iterations to success (successful trials)")
    ax2.set_ylim(bottom=0, top=max(args.iters * 1.05, 1))
    ax2.axhline(args.iters, color="0.6", lw=0.8, ls="--", label=f"budget ({args.iters:,} iterations)")
    ax2.set_title("Iterations to success")
    for ax in (ax1, ax2):
        ax.set_xticks(all_ns)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    what = "Memorisation of a delayed bit stream (Fig. 8)" if task == "memorise" else \
        "Addition of a bit stream to its delayed self (Fig. 9)"
    fig.suptitle(f"{what}: RNN 1-(N+{args.spare_memorise if task == 'memorise' else args.spare_add})-2, "
                 f"Adam lr {args.lr}, budget {args.iters:,} iterations, {len(args.seed_list)} seed(s) per point\n"
                 "(methods offset slightly sideways so that coinciding points stay visible)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", choices=[*TASKS, "both"], default="both", help="memorise (Fig. 8), add (Fig. 9)")
    p.add_argument("--N", type=str, default="2,4,6,8,10,12,14,16,18,20,25,30",
                   help="delay lengths, comma separated")
    p.add_argument("--seeds", type=int, default=10, help="trials (seeds 0..seeds−1) per task, N and method")
    p.add_argument("--iters", type=int, default=50_000, help="Adam iterations per trial (paper: 50,000)")
    p.add_argument("--eval-every", type=int, default=100, help="iterations between test evaluations")
    p.add_argument("--methods", type=str, default=",".join(METHODS), help=f"comma separated, from {METHODS}")
    p.add_argument("--n-train", type=int, default=8000, help="training streams")
    p.add_argument("--n-test", type=int, default=1000, help="fresh test streams")
    p.add_argument("--n-ref", type=int, default=100, help="reference streams n̄ (the first training streams)")
    p.add_argument("--batch", type=int, default=100, help="minibatch size")
    p.add_argument("--extra-length", type=int, default=50, help="streams are N + this long")
    p.add_argument("--spare-memorise", type=int, default=3, help="hidden nodes N + this for memorise")
    p.add_argument("--spare-add", type=int, default=5, help="hidden nodes N + this for add")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (all methods)")
    p.add_argument("--lam", type=float, default=0.1, help="ridge λ of eq. 6-7")
    p.add_argument("--target-std", type=float, default=1.0, help="σ of the truncated-normal initial targets")
    p.add_argument("--no-early-stop", action="store_true", help="keep training after success")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (the nets are tiny)")
    p.add_argument("--out", type=Path, default=Path("docs/bitstream"), help="output folder")
    p.add_argument("--plot-only", action="store_true",
                   help="redraw bitstream_<task>.png from the bitstream_<task>.json already in --out, no training")
    p.add_argument("--quick", action="store_true", help="N = 2, 3; 100 iterations; 1 seed; small data: a smoke test")
    p.add_argument("--resume", action="store_true",
                   help="keep the runs already in --out's JSON (same settings) and run only the missing ones")
    p.add_argument("--stop-after-fail", action="store_true",
                   help="skip a method at every N above the first N at which it failed on every seed")
    args = p.parse_args(argv)
    if args.quick:
        args.N, args.seeds, args.iters, args.eval_every = "2,3", 1, min(args.iters, 100), min(args.eval_every, 50)
        args.n_train, args.n_test = min(args.n_train, 1000), min(args.n_test, 200)
    args.delays = sorted({int(n) for n in args.N.split(",")})
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.seed_list = list(range(args.seeds))
    args.tasks = list(TASKS) if args.task == "both" else [args.task]
    if bad := [m for m in args.method_list if m not in METHODS]:
        p.error(f"unknown methods {bad}; choose from {METHODS}")
    if (args.iters < 0 or args.eval_every < 1 or args.threads < 1 or args.seeds < 1 or min(args.delays) < 1
            or args.n_ref > args.n_train or args.batch > args.n_train):
        p.error("need --iters ≥ 0, --eval-every ≥ 1, --threads ≥ 1, --seeds ≥ 1, N ≥ 1, "
                "--n-ref and --batch ≤ --n-train")
    return args


# settings a resumed sweep must share with the JSON it continues
RESUME_KEYS = ("task", "iters", "eval_every", "n_train", "n_test", "n_ref", "batch", "extra_length", "spare_memorise",
               "spare_add", "lr", "lam", "target_std", "no_early_stop", "quick")


def resumed(js: Path, config: dict) -> list[dict]:
    """The runs of an earlier sweep in ``js`` (each finished run is written at once), if its settings match."""
    if not js.is_file():
        return []
    old = json.loads(js.read_text())
    differ = {k: (old["config"].get(k), config.get(k)) for k in RESUME_KEYS
              if k != "task" and old["config"].get(k) != config.get(k)}
    if differ:
        raise SystemExit(f"--resume: {js} was run with other settings (old, new): {differ}; "
                         "use another --out or the same settings")
    return old["runs"]


def failed_everywhere_below(runs: list[dict], method: str, n: int, seeds: int) -> bool:
    """Whether ``method`` failed on all ``seeds`` seeds at some N below ``n`` (the sweep then stops it)."""
    by_n: dict = {}
    for r in runs:
        if r["method"] == method and r["N"] < n:
            by_n.setdefault(r["N"], []).append(r["success"])
    return any(len(v) >= seeds and not any(v) for v in by_n.values())


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results = {}
    if args.plot_only:
        for task in args.tasks:
            js = args.out / f"bitstream_{task}.json"
            if not js.is_file():
                continue
            summary = json.loads(js.read_text())
            saved = argparse.Namespace(**summary["config"])
            plot(summary["summary"], task, saved, args.out / f"bitstream_{task}.png")
            print(f"redrew {args.out / f'bitstream_{task}.png'} from {js}")
            results[task] = summary
        return results
    for task in args.tasks:
        jobs = [(n, m, s) for n in args.delays for m in args.method_list for s in args.seed_list]
        js, png = args.out / f"bitstream_{task}.json", args.out / f"bitstream_{task}.png"
        runs, t0 = (resumed(js, config) if args.resume else []), time.perf_counter()
        done = {(r["N"], r["method"], r["seed"]) for r in runs}

        def stopped(n, m):  # --stop-after-fail: m failed on every seed at some N below n
            return args.stop_after_fail and failed_everywhere_below(runs, m, n, len(args.seed_list))

        bar = tqdm(jobs, desc=task, unit="run", dynamic_ncols=True, file=sys.stdout)
        table = summarise(runs, task, args.delays, args.method_list)
        summary = None
        for n, m, s in bar:
            if (n, m, s) in done:
                continue
            if stopped(n, m):
                continue
            bar.set_postfix(N=n, method=m, seed=s)
            r = run_one(task, n, m, s, args)
            runs.append(r)
            tqdm.write(f"{task} N={n:<3} {m:<10} seed {s}: "
                       f"{'success at ' + str(r['iters_to_success']) if r['success'] else 'failure':<17} "
                       f"final acc {r['final_test_acc']:.4f}, {r['wall_seconds']:.1f} s, "
                       f"{1e3 * (r['seconds_per_iter_median'] or 0):.2f} ms/it", file=sys.stdout)
            table = summarise(runs, task, args.delays, args.method_list)
            summary = {
                "paper": "Fairbank, Samothrakis, Citi, Deep Learning in Target Space, JMLR 2022, section 5.3, "
                         + ("Fig. 8" if task == "memorise" else "Fig. 9"),
                "task": task, "config": config, "budget_iters": args.iters,
                "success_accuracy": SUCCESS_ACCURACY, "complete": False,  # set once the loop ends
                "wall_seconds": time.perf_counter() - t0 + sum(r.get("wall_seconds", 0) for r in runs[:len(done)]),
                "summary": table, "runs": runs,
                "torch": torch.__version__,
            }
            js.write_text(json.dumps(summary, indent=1))
        bar.close()
        if summary is None:  # everything was resumed or skipped
            summary = json.loads(js.read_text()) if js.is_file() else {"summary": table, "wall_seconds": 0.0}
        if runs:  # complete: every point run, or skipped by --stop-after-fail past a method's all-fail N
            ran = {(r["N"], r["method"], r["seed"]) for r in runs}
            summary["complete"] = all((n, m, s) in ran or stopped(n, m) for n, m, s in jobs)
            js.write_text(json.dumps(summary, indent=1))
        plot(table, task, args, png)
        results[task] = summary
        print(f"\n{task}: success ratio / mean iterations to success (budget {args.iters:,})")
        print(f"{'N':>4}" + "".join(f"{m:>22}" for m in args.method_list))
        for n in args.delays:
            cells = []
            for m in args.method_list:
                c = table.get(m, {}).get(str(n))
                if c is None:  # skipped (--stop-after-fail) or not run
                    cells.append("skipped")
                    continue
                it = "-" if c["mean_iters_to_success"] is None else f"{c['mean_iters_to_success']:.0f}"
                cells.append(f"{c['successes']}/{c['trials']} {it:>8}")
            print(f"{n:>4}" + "".join(f"{c:>22}" for c in cells))
        print(f"wrote {png} and {js} ({summary['wall_seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
