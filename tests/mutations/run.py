"""The mutation audit: apply each curated one-line mutation to a copy of the package, run the tests named for
it, and report which mutations the tests catch.

A mutation list is a ``*.diff`` file in this folder, one block per mutation::

    # --- NAME: what the mutation does to the code
    # tests: tests/test_x.py::test_one tests/test_y.py -k "expr"      (pytest arguments)
    diff --git a/target_param/... b/target_param/...
    ...

A block is applied with ``git apply --recount`` to a fresh copy of ``target_param/`` (the tests and everything
else are copied once), so line numbers may drift with the code; a block whose context no longer matches is
reported *stale* and must be rewritten. Then ``pytest -x`` runs its tests in the copy:

* caught: a test failed;
* survived: every test passed (the mutation is a change that the suite cannot see);
* broken: pytest could not run the tests (the mutant does not import, or collection failed);
* stale: the block no longer applies.

Run from the repository root (about 15 minutes for every list on 2 cores; not part of ``make test``)::

    python tests/mutations/run.py                     # every list, every mutation
    python tests/mutations/run.py --only fn1,fn5      # mutations whose name starts so
    python tests/mutations/run.py --jobs 2 --json out/mutations.json
    python tests/mutations/run.py --make target_param/solver.py "old text" "new text"   # print a new block

The exit status is the number of mutations not caught (survived, broken, stale), capped at 100.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
COPIED = ("target_param", "tests", "examples", "benchmarks", "docs", "README.md", "pyproject.toml")
IGNORED = shutil.ignore_patterns("__pycache__", ".pytest_cache", ".hypothesis", "state", "*.pt", "*.png")


@dataclass
class Mutation:
    name: str
    description: str
    tests: list[str]
    diff: str
    source: str


@dataclass
class Outcome:
    name: str
    status: str  # caught | survived | broken | stale
    seconds: float
    detail: str = ""


def parse(path: Path) -> list[Mutation]:
    """The mutation blocks of one list."""
    blocks = re.split(r"^(?=# --- )", path.read_text(), flags=re.M)
    out = []
    for block in blocks:
        head = re.match(r"# --- ([\w.-]+): (.*)\n", block)
        if head is None:
            continue
        tests = re.search(r"^# tests: (.*)$", block, flags=re.M)
        if tests is None:
            raise SystemExit(f"{path.name}: mutation {head[1]} names no tests ('# tests: ...' line)")
        diff = block[block.index("diff --git"):].rstrip("\n") + "\n"  # (blank lines between blocks are no context)
        out.append(Mutation(head[1], head[2].strip(), shlex.split(tests[1]), diff, path.name))
    return out


def _copy_tree(dest: Path) -> None:
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=IGNORED)
        elif src.is_file():
            shutil.copy2(src, dest / name)


def run_one(m: Mutation, base: Path, timeout: float) -> Outcome:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"mut-{m.name}-") as tmp:
        work = Path(tmp)
        for item in base.iterdir():  # the package is copied (it is mutated), the rest linked
            if item.name == "target_param":
                shutil.copytree(item, work / item.name)
            else:
                (work / item.name).symlink_to(item)
        applied = subprocess.run(["git", "apply", "--recount", "-"], input=m.diff, text=True, cwd=work,
                                 capture_output=True)
        if applied.returncode:
            return Outcome(m.name, "stale", time.perf_counter() - t0, applied.stderr.strip().splitlines()[0])
        env = dict(os.environ, CI="true", PYTHONDONTWRITEBYTECODE="1")
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-W", "ignore", *m.tests]
        try:
            proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return Outcome(m.name, "caught", time.perf_counter() - t0, f"timed out after {timeout:.0f} s")
    tail = (proc.stdout.strip().splitlines() or [""])[-1]
    status = {0: "survived", 1: "caught"}.get(proc.returncode, "broken")
    if status == "caught":
        failed = re.search(r"^FAILED (\S+)", proc.stdout, flags=re.M)
        tail = failed[1] if failed else tail
    return Outcome(m.name, status, time.perf_counter() - t0, tail)


def make_block(path: str, old: str, new: str) -> str:
    """A mutation block replacing the one occurrence of ``old`` in ``path`` by ``new`` (name and tests to fill)."""
    import difflib

    text = (ROOT / path).read_text()
    if text.count(old) != 1:
        raise SystemExit(f"{path}: the text to mutate must occur exactly once (found {text.count(old)})")
    lines = difflib.unified_diff(text.splitlines(True), text.replace(old, new).splitlines(True),
                                 f"a/{path}", f"b/{path}", n=3)
    return f"# --- NAME: {path}: what it does\n# tests: TESTS\ndiff --git a/{path} b/{path}\n" + "".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("lists", nargs="*", type=Path, help="mutation lists (default: every *.diff in tests/mutations)")
    p.add_argument("--only", default="", help="comma-separated name prefixes")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--timeout", type=float, default=900, help="seconds per mutation")
    p.add_argument("--json", type=Path, default=None, help="also write the outcomes here")
    p.add_argument("--make", nargs=3, metavar=("FILE", "OLD", "NEW"), help="print a new mutation block and exit")
    args = p.parse_args(argv)
    if args.make:
        print(make_block(*args.make))
        return 0
    lists = args.lists or sorted(HERE.glob("*.diff"))
    mutations = [m for path in lists for m in parse(path)]
    prefixes = [s for s in args.only.split(",") if s]
    if prefixes:
        mutations = [m for m in mutations if any(m.name.startswith(s) for s in prefixes)]
    if not mutations:
        raise SystemExit("no mutation selected")
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="mut-base-") as base:
        _copy_tree(Path(base))
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            futures = {pool.submit(run_one, m, Path(base), args.timeout): m for m in mutations}
            for f in concurrent.futures.as_completed(futures):
                o = f.result()
                outcomes.append(o)
                print(f"{o.status:<8} {o.name:<40} {o.seconds:6.1f} s  {o.detail}", flush=True)
    counts = {s: sum(o.status == s for o in outcomes) for s in ("caught", "survived", "broken", "stale")}
    print(f"\n{len(outcomes)} mutations: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"counts": counts, "outcomes": [asdict(o) for o in outcomes]}, indent=1))
    return min(100, len(outcomes) - counts["caught"])


if __name__ == "__main__":
    sys.exit(main())
