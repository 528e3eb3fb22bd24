"""benchmarks/results/history.csv: one row per configuration of every benchmark run, from the run JSONs.

    .venv/bin/python benchmarks/history.py [--results DIR]

Columns: date (of the run, from the file name), commit (git HEAD when it ran, ``+`` when the library had
uncommitted changes), machine (CPU or GPU model, threads, device), config, T/W (median of per-pair ratios;
for a run with ``--repeats``, the median of its processes' medians),
FLOPs T/W, memory T/W (peak), and the file. Rows already in the CSV are kept, so a run's figures stay after
its JSON is removed (only the latest full run per machine, and the runs the docs cite, are kept as JSON);
a JSON present now replaces its rows. Written sorted by date, then config order.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ["date", "commit", "machine", "config", "T/W", "FLOPs T/W", "memory T/W", "file"]


def _num(v) -> str:
    return "" if v is None else f"{v:.3f}"


def rows_of(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    m = data.get("machine", {})
    stamp = re.search(r"(\d{8})-(\d{6})", path.name)
    date = f"{stamp[1][:4]}-{stamp[1][4:6]}-{stamp[1][6:]} {stamp[2][:2]}:{stamp[2][2:4]}" if stamp else ""
    commit = (m.get("git_head") or "") + ("+" if m.get("git_dirty_target_param") else "")
    machine = f"{m.get('gpu') or m.get('cpu_model', '?')}, {m.get('torch_num_threads', '?')} thread(s), {m.get('device', '?')}"
    out = []
    for r in data.get("rows", []):
        if r.get("status") != "ok" or "ratio" not in r:
            continue
        out.append({"date": date, "commit": commit, "machine": machine, "config": r["config"],
                    "T/W": _num(r.get("ratio_processes", r["ratio"])), "FLOPs T/W": _num(r.get("flop_ratio")),
                    "memory T/W": _num(r.get("mem_ratio")), "file": path.name})
    return out


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Regenerate history.csv from the run JSONs.")
    p.add_argument("--results", type=Path, default=RESULTS)
    results = p.parse_args(argv).results
    CSV = results / "history.csv"
    kept = []
    if CSV.exists():
        with CSV.open() as f:
            kept = list(csv.DictReader(f))
    present = sorted(p for p in results.glob("*.json") if not p.name.startswith("habits-"))
    fresh = [row for p in present for row in rows_of(p)]
    files = {row["file"] for row in fresh}
    rows = [r for r in kept if r["file"] not in files] + fresh
    rows.sort(key=lambda r: (r["date"], r["file"]))
    with CSV.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    print(f"{CSV}: {len(rows)} rows from {len({r['file'] for r in rows})} runs ({len(present)} JSON files present)")


if __name__ == "__main__":
    main()
