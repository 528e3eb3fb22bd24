"""Smoke test of benchmarks/bench.py: it runs and writes finite, positive ratios (no timing thresholds)."""
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--quick", "--configs", "spirals,mlp",
         "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1, files
    data = json.loads(files[0].read_text())
    assert data["machine"]["torch_num_threads"] == 1
    rows = {r["config"]: r for r in data["rows"]}
    assert set(rows) == {"spirals", "mlp"}
    for name, row in rows.items():
        assert row["status"] == "ok", (name, row.get("status"), row.get("traceback"))
        for key in ("ratio", "ratio_p25", "ratio_p75", "ratio_of_medians", "weight_median_s", "target_median_s",
                    "floor_ratio", "floor_median_s"):
            assert math.isfinite(row[key]) and row[key] > 0, (name, key, row[key])
        assert all(math.isfinite(r) and r > 0 for r in row["pair_ratios"])
        assert row["weight_mem"]["peak_bytes"] > 0 and row["target_mem"]["peak_bytes"] > 0
    # FLOPs: the weight-space mlp step counted by hand (784-128×8-10, n = 100): each Linear costs 2·n·d_in·d_out
    # forward and again for each of its two gradients, except the input gradient of the first layer
    sizes = [784] + [128] * 8 + [10]
    macs = [a * b for a, b in zip(sizes, sizes[1:])]
    assert rows["mlp"]["flops"]["weight"] == 2 * 100 * (3 * sum(macs) - macs[0])
    for name, row in rows.items():
        f = row["flops"]
        assert f["target"] > f["floor"] > f["weight"] > 0, (name, f)
        assert math.isclose(row["flop_ratio"], f["target"] / f["weight"])
        assert sum(f["target_by_op"].values()) == f["target"]
    assert "spirals" in proc.stdout and "T/W" in proc.stdout and "FLOPs T/W" in proc.stdout


def test_bench_repeats_in_fresh_processes(tmp_path):
    """--repeats 2: the configuration is measured again in a second process and both ratios are reported."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--quick", "--configs", "spirals", "--repeats", "2",
         "--no-memory", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = json.loads(next(tmp_path.glob("*.json")).read_text())["rows"]
    assert row["status"] == "ok" and "repeat_errors" not in row, row.get("repeat_errors")
    ratios = row["process_ratios"]
    assert len(ratios) == 2 and ratios[0] == row["ratio"]
    assert all(math.isfinite(r) and r > 0 for r in ratios)
    assert math.isclose(row["ratio_processes"], (ratios[0] + ratios[1]) / 2)
    assert len(row["process_floor_ratios"]) == 2 and all(f > 0 for f in row["process_floor_ratios"])
    assert "processes" in proc.stdout and f"[{min(ratios):.2f}–{max(ratios):.2f}]" in proc.stdout


def test_ab_runs_against_a_revision_and_against_itself():
    """benchmarks/ab.py: the working tree against HEAD (git archive) and against a copy of itself (the null
    A/B); each prints finite positive ratios (no timing thresholds)."""
    import re

    for base in ("HEAD", "WORKTREE"):
        proc = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "ab.py"), "spirals", "--base", base, "--pairs", "6",
             "--warmup", "1"], cwd=ROOT, capture_output=True, text=True, timeout=600,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        m = re.search(r"new/base ([0-9.]+) .*T/W new ([0-9.]+)x, base ([0-9.]+)x", proc.stdout)
        assert m and all(float(v) > 0 for v in m.groups()), proc.stdout
        assert f"(base: {base})" in proc.stdout


def test_history_csv_keeps_rows_of_removed_runs_and_reads_present_ones(tmp_path):
    import csv
    import shutil

    results = ROOT / "benchmarks" / "results"
    src = results / "cpu-amd-epyc-t1-20261127-202705.json"
    shutil.copy(src, tmp_path / src.name)
    shutil.copy(results / "history.csv", tmp_path / "history.csv")
    run = [sys.executable, str(ROOT / "benchmarks" / "history.py"), "--results", str(tmp_path)]
    assert subprocess.run(run, capture_output=True, text=True, timeout=120).returncode == 0
    rows = list(csv.DictReader((tmp_path / "history.csv").open()))
    data = json.loads(src.read_text())
    mine = {r["config"]: r for r in rows if r["file"] == src.name}
    for row in data["rows"]:
        want = row.get("ratio_processes", row["ratio"])
        assert abs(float(mine[row["config"]]["T/W"]) - want) < 5e-4
        assert mine[row["config"]]["commit"] == data["machine"]["git_head"]
    # runs whose JSON is gone stay (the committed CSV holds more files than the folder keeps)
    assert len({r["file"] for r in rows}) > len(list(results.glob("cpu-*.json")))
