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


def test_cnn_quick(tmp_path):
    # Synthetic data: no dataset files needed.
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "cnn.py"), "--quick", "--out", str(tmp_path),
         "--data-root", str(tmp_path / "no-data-here")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    png, js = tmp_path / "cnn.png", tmp_path / "cnn.json"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(js.read_text())
    assert summary["data"] == "synthetic" and summary["config"]["quick"]
    methods = {"target", "weight", "weight_bn"}
    assert set(summary["summary"]) == methods and set(summary["timing"]) == methods
    assert {(r["method"], r["seed"]) for r in summary["runs"]} == {(m, s) for m in methods for s in (0, 1)}
    steps = {r["steps"] for r in summary["runs"]}
    assert len(steps) == 1  # the same budget for every method
    for r in summary["runs"]:
        c = r["curve"]
        assert c["step"][0] == 0 and c["step"][-1] == r["steps"]
        assert all(0.0 <= a <= 1.0 for a in c["test_acc"]) and all(math.isfinite(v) for v in c["test_loss"])
        assert r["train_seconds"] > 0 and c["train_seconds"] == sorted(c["train_seconds"])
    for s in summary["summary"].values():
        assert s["seeds"] == 2 and 0.0 <= s["final_test_acc_mean"] <= 1.0 and s["final_test_acc_std"] >= 0.0


def _cnn_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("cnn_example", EXAMPLES / "cnn.py")
    cnn = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cnn)
    return cnn


def test_cnn_prepare_data(tmp_path):
    # The Debian-package layout (gzipped IDX files) unpacked where torchvision reads it.
    import gzip

    import torch

    cnn = _cnn_module()
    src = tmp_path / "src"
    src.mkdir()
    for split, n in (("train", 6), ("t10k", 4)):
        images = bytes([0, 0, 8, 3]) + n.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + bytes(range(n)) * 784
        labels = bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + bytes(k % 10 for k in range(n))
        (src / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(images))
        (src / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
    raw = cnn.prepare(src, tmp_path / "root", "fashion")
    assert raw == tmp_path / "root" / "FashionMNIST" / "raw"
    data = cnn.load_dataset("fashion", tmp_path / "root")
    assert data["x_train"].shape == (6, 1, 28, 28) and data["x_test"].shape == (4, 1, 28, 28)
    assert data["y_train"].tolist() == [0, 1, 2, 3, 4, 5] and data["x_train"].dtype == torch.float32


def test_cnn_summary_compares_at_equal_epochs_and_equal_time():
    # Two weight-space seeds of 18 s and 22 s and one target-space seed of 80 s, evaluated at epochs 0, 1, 2.
    def run(method, seconds, accs):
        return {"method": method, "final_test_acc": accs[-1], "best_test_acc": max(accs), "epochs": 2,
                "train_seconds": seconds[-1], "seconds_per_step_median": 1.0,
                "curve": {"epoch": [0, 1, 2], "train_seconds": seconds, "test_acc": accs}}

    runs = [run("weight", [0, 10, 18], [0.1, 0.5, 0.9]), run("weight", [0, 10, 22], [0.3, 0.5, 0.7]),
            run("target", [0, 40, 80], [0.2, 0.6, 0.8])]
    s = _cnn_module().summarise(runs, ["target", "weight", "weight_bn"])
    assert set(s) == {"target", "weight"}
    assert s["weight"]["test_acc_by_epoch"] == pytest.approx({"0": 0.2, "1": 0.5, "2": 0.8})
    assert s["target"]["test_acc_by_epoch"] == pytest.approx({"0": 0.2, "1": 0.6, "2": 0.8})
    # equal time = the weight runs' mean 20 s: target space halfway between its evaluations at 0 s and 40 s;
    # the first weight seed has ended (its final 0.9), the second is 10/12 of the way from 0.5 to 0.7
    assert s["target"]["common_seconds"] == s["weight"]["common_seconds"] == 20
    assert s["target"]["test_acc_at_common_seconds"] == pytest.approx(0.4)
    assert s["weight"]["test_acc_at_common_seconds"] == pytest.approx((0.9 + 0.5 + 0.2 * 10 / 12) / 2)
    assert s["weight"]["final_test_acc_mean"] == pytest.approx(0.8)


def test_timm_finetune_quick(tmp_path):
    pytest.importorskip("timm")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "timm_finetune.py"), "--quick", "--out", str(tmp_path),
         "--data-root", str(tmp_path / "no-data-here")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    png, js = tmp_path / "timm_resnet18.png", tmp_path / "timm_resnet18.json"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(js.read_text())
    assert summary["data"] == "synthetic" and summary["config"]["steps"] == 4
    runs = summary["runs"]
    assert set(runs) == {"target", "weight"}
    for r in runs.values():
        assert r["curve"]["step"][0] == 0 and r["curve"]["step"][-1] == 4
        assert all(0.0 <= a <= 1.0 for a in r["curve"]["test_acc"])
        assert r["train_seconds"] > 0
    # Leaving target space keeps the trained function.
    assert runs["target"]["back_to_weight_space_max_abs_logit_change"] < 1e-3


def test_cnn_quick_max_positions(tmp_path):
    """--max-positions reaches the conversion: the target-space model's conv targets are the subset's."""
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "cnn.py"), "--quick", "--methods", "target", "--max-positions", "300", "--out", str(tmp_path), "--data-root", str(tmp_path / "no-data-here")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "cnn.json").read_text())
    assert summary["config"]["max_positions"] == 300
    assert summary["runs"] and {r["method"] for r in summary["runs"]} == {"target"}
    for run in summary["runs"]:
        assert run["parameters"] < 100 * 16 * 28 * 28  # the first conv alone has n̄·C·H·W exact targets
        assert all(math.isfinite(v) for v in run["curve"]["test_loss"])


def test_bitstream_sweep_resumes_and_stops_a_method_after_it_fails_everywhere(tmp_path):
    """A sweep cut short continues where it stopped: --resume keeps the finished runs (same settings) and runs
    only the missing points; --stop-after-fail skips a method at every N above one where all its seeds failed;
    other settings are refused."""
    base = [sys.executable, str(EXAMPLES / "bitstream.py"), "--task", "memorise", "--out", str(tmp_path),
            "--methods", "weight,target_scu", "--iters", "5", "--eval-every", "5", "--seeds", "1",
            "--n-train", "200", "--n-test", "50"]

    def run(*extra):
        proc = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=300)
        return proc, (json.loads((tmp_path / "bitstream_memorise.json").read_text())
                      if (tmp_path / "bitstream_memorise.json").is_file() else None)
    proc, first = run("--N", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {(r["N"], r["method"]) for r in first["runs"]} == {(2, "weight"), (2, "target_scu")}
    assert not any(r["success"] for r in first["runs"])  # 5 iterations: every run fails
    proc, second = run("--N", "2,3,4", "--resume", "--stop-after-fail")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert second["runs"][:2] == first["runs"]  # kept, not rerun
    assert {(r["N"], r["method"]) for r in second["runs"]} == {(2, "weight"), (2, "target_scu")}  # N = 3, 4 skipped
    assert first["complete"] and second["complete"]  # skipped by the stop rule still counts as done
    proc, third = run("--N", "2,3", "--resume")
    assert proc.returncode == 0 and {r["N"] for r in third["runs"]} == {2, 3}
    proc, _ = run("--N", "2,3", "--resume", "--lam", "0.5")
    assert proc.returncode != 0 and "other settings" in proc.stderr


def test_depth_quick_runs_and_resumes(tmp_path):
    cmd = [sys.executable, str(EXAMPLES / "depth.py"), "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = json.loads((tmp_path / "depth.json").read_text())
    methods = {"target", "target_project", "target_sigma01", "weight_glorot", "weight_default", "weight_layernorm"}
    assert {(r["depth"], r["method"], r["lr"]) for r in state["runs"]} == {
        (d, m, lr) for d in (2, 3) for m in methods for lr in (1e-3, 1e-2)}
    assert all(0.0 <= r["test_acc"] <= 1.0 for r in state["runs"])
    for r in state["runs"]:  # the step-0 diagnostics (one per Linear layer) and the reference-batch fit
        assert len(r["step0"]["gain"]) == len(r["step0"]["grad_norm"]) == r["depth"]
        assert len(r["ref_every_50"]) == 1 and 0.0 <= r["ref_every_50"][0][1] <= 1.0
    assert set(state["step0"]["methods"]) == methods - {"weight_layernorm"}
    for png in ("depth.png", "depth3_step0.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # nothing left to run
    assert again.returncode == 0 and json.loads((tmp_path / "depth.json").read_text())["runs"] == state["runs"]


def test_ddp_quick_under_torchrun(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(EXAMPLES / "ddp.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["iterations"] == 40
    assert [e["iteration"] for e in summary["log"]] == [20, 40]
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    # the gathered single-process model computes the sharded one's function (float32, after 40 Adam steps)
    assert summary["single_process_gap"] < 1e-2


def test_cnn_resumes_from_its_saved_state(tmp_path):
    def cnn(out, *extra):
        proc = subprocess.run(
            [sys.executable, str(EXAMPLES / "cnn.py"), "--quick", "--methods", "target,weight", "--seeds", "1",
             "--out", str(out), "--data-root", str(tmp_path / "no-data-here"), *extra],
            capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout, {r["method"]: r for r in json.loads((out / "cnn.json").read_text())["runs"]}

    # 7 steps (5 an epoch), with a saved state at step 6; then 11 steps, resumed from step 6, which reshuffle
    # at step 10 with the saved generator
    cnn(tmp_path / "a", "--resume", "--checkpoint-every", "3", "--epochs", "1.4")
    log, resumed = cnn(tmp_path / "a", "--resume", "--checkpoint-every", "3", "--epochs", "2.2")
    assert "resumed at step 6" in log
    _, fresh = cnn(tmp_path / "b", "--epochs", "2.2")
    for m in ("target", "weight"):
        assert resumed[m]["steps"] == fresh[m]["steps"] == 11
        assert resumed[m]["curve"]["step"] == fresh[m]["curve"]["step"]
        assert resumed[m]["curve"]["test_acc"] == fresh[m]["curve"]["test_acc"], m  # the same training exactly
        assert resumed[m]["curve"]["test_loss"] == fresh[m]["curve"]["test_loss"], m
    log, again = cnn(tmp_path / "a", "--resume", "--checkpoint-every", "3", "--epochs", "2.2")  # finished: read back
    assert "finished before" in log and again["target"]["curve"] == resumed["target"]["curve"]


def test_hf_finetune_quick_trains_both_spaces(tmp_path):
    pytest.importorskip("transformers")
    proc = subprocess.run([sys.executable, str(EXAMPLES / "hf_finetune.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = json.loads((tmp_path / "hf_finetune.json").read_text())["runs"]
    assert set(runs) == {"weight", "target"} and all(len(r["losses"]) == 8 for r in runs.values())
    assert all(math.isfinite(r["held_out_loss"]) for r in runs.values())
    assert (tmp_path / "hf_finetune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
