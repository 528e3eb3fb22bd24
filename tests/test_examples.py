"""Smoke tests of the examples: each runs end to end in its quick mode and writes its outputs."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_two_spirals_quick(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "two_spirals.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    png, js = tmp_path / "two_spirals.png", tmp_path / "two_spirals.json"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(js.read_text())
    assert summary["config"]["iters"] == 300
    for space in ("target_space", "weight_space"):
        res = summary[space]
        for key in ("final_train_acc", "final_test_acc"):
            assert 0.0 <= res[key] <= 1.0, (space, key, res[key])
        curve = res["curve"]
        assert curve["iter"][0] == 0 and curve["iter"][-1] == 300
        assert all(0.0 <= a <= 1.0 for a in curve["train_acc"] + curve["test_acc"])
        assert all(math.isfinite(v) for v in curve["train_loss"] + curve["test_loss"])
        first = res["first_100pct_train_iter"]
        assert first is None or 0 <= first <= 300
        assert res["seconds_per_iter_median"] > 0
    # Leaving target space keeps the trained function.
    assert summary["target_space"]["conversion_max_abs_logit_change"] < 1e-3


def test_bitstream_quick(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "bitstream.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    methods = {"target_scu", "target_ocu", "weight", "lstm"}
    for task in ("memorise", "add"):
        png, js = tmp_path / f"bitstream_{task}.png", tmp_path / f"bitstream_{task}.json"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        summary = json.loads(js.read_text())
        assert summary["task"] == task and summary["complete"]
        budget = summary["budget_iters"]
        assert budget == summary["config"]["iters"] == 100
        runs = summary["runs"]
        assert {(r["N"], r["method"]) for r in runs} == {(n, m) for n in (2, 3) for m in methods}
        for r in runs:
            assert 0.0 <= r["final_test_acc"] <= r["best_test_acc"] <= 1.0, r
            assert r["hidden"] == r["N"] + (3 if task == "memorise" else 5)
            assert r["length"] == r["N"] + 50
            assert r["wall_seconds"] > 0 and r["seconds_per_iter_median"] > 0
            assert r["success"] == (r["iters_to_success"] is not None)
            if r["success"]:
                assert 0 <= r["iters_to_success"] <= budget and r["best_test_acc"] >= 0.99
            else:
                assert r["iters_run"] == budget and r["best_test_acc"] < 0.99
            assert r["curve"]["iter"][0] == 0
        for m in methods:
            for n in ("2", "3"):
                cell = summary["summary"][m][n]
                assert cell["trials"] == 1 and 0.0 <= cell["success_ratio"] <= 1.0


@pytest.mark.parametrize("part", ["fig5", "fig6", "fig7"])
def test_two_spirals_study_quick(tmp_path, part):
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "two_spirals_study.py"), "--quick", "--only", part, "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    png = tmp_path / f"two_spirals_{part}.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "two_spirals_study.md").read_text()
    assert "| method |" in md and "median epochs to 100% train" in md
    summary = json.loads((tmp_path / "two_spirals_study.json").read_text())
    cfg = summary["config"]
    assert cfg["only"] == [part] and cfg["epochs"] == 100 and cfg["epochs_sens"] == 50
    if part == "fig7":
        expected = {f"nbar={n}" for n in (8, 17, 194)} | {f"lam={x:g}" for x in (1e-5, 1e-3, 1.0)}
    else:
        expected = {"fig5": {"gd_target", "gd_weight", "adam_target", "adam_weight"},
                    "fig6": {"adam_target", "adam_ocu", "adam_weight", "adam_weight_bn"}}[part]
    assert set(summary["summary"]) == expected
    for name, s in summary["summary"].items():
        assert s["seeds"] == (1 if part == "fig7" else 2)
        assert 0 <= s["reached_100pct"] <= s["seeds"]
        mean, std = s["final_test_acc_mean_std"]
        assert mean is None or (0.0 <= mean <= 1.0 and std >= 0.0)
    for r in summary["runs"]:
        if r["error"] is None:
            budget = 50 if part == "fig7" else 100
            assert r["curve"]["iter"][0] == 0 and r["curve"]["iter"][-1] == budget
            assert all(0.0 <= a <= 1.0 for a in r["curve"]["train_acc"] + r["curve"]["test_acc"])
            assert r["first_100pct_train_iter"] is None or 0 <= r["first_100pct_train_iter"] <= budget
