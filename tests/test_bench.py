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
    assert "spirals" in proc.stdout and "T/W" in proc.stdout
