"""``tp.benchmark`` and ``python -m target_param.benchmark``: they run, measure what they say (FLOPs against a
count by hand, parameter totals against a converted copy), leave the model alone, and refuse a bad model
spec with the accepted forms (no timing thresholds)."""
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import target_param as tp
from conftest import assert_same_state, model_state

ROOT = Path(__file__).resolve().parents[1]


def tiny():
    """A model factory for the command line (``test_benchmark_api:tiny``)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))


def test_benchmark_function_measures_a_user_model():
    model = tiny()
    before = model_state(model)
    ref, batch = torch.randn(32, 8), torch.randn(16, 8)
    r = tp.benchmark(model, ref, batch, steps=4, progress=False, lam=1e-3)
    assert_same_state(before, model_state(model))  # measured on copies
    assert r.pairs == 4 and r.layers == 2
    assert 0 < r.ratio_iqr[0] <= r.ratio <= r.ratio_iqr[1] and r.weight_ms > 0 and r.target_ms > 0
    w, t = r.raw["weight_s"], r.raw["target_s"]  # the table's numbers are the statistics of these timings
    assert len(w) == len(t) == 4 and r.weight_ms == pytest.approx(1e3 * sorted(w)[1:3][0] / 2 + 1e3 * sorted(w)[2] / 2)
    assert r.ratio == pytest.approx(statistics.median(b / a for a, b in zip(w, t)))
    # FLOPs of a weight-space step by hand: forward 2·16·8·16 + 2·16·16·2; backward: both weight gradients and
    # the hidden layer's input gradient (the input needs none)
    assert r.raw["weight_flops"] == (4096 + 1024) + (4096 + 1024 + 1024)
    assert r.flop_ratio == r.raw["target_flops"] / r.raw["weight_flops"] > 1
    converted = tp.to_target_space(tiny(), ref, lam=1e-3)
    assert r.target_params == sum(p.numel() for p in converted.parameters()) == 32 * 16 + 32 * 2
    assert r.weight_peak_mb > 0 and r.target_peak_mb > 0 and r.memory_ratio > 0
    assert "T/W" in str(r) and f"{r.ratio:.2f}×" in str(r)
    with pytest.raises(tp.InvalidArgumentError, match="steps"):
        tp.benchmark(model, ref, batch, steps=1)


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
    return subprocess.run([sys.executable, "-m", "target_param.benchmark", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_command_line_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "r.json"
    proc = _cli("test_benchmark_api:tiny", "--input", "8", "--batch", "16", "--ref", "32", "--steps", "3",
                "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "T/W" in proc.stdout and "2 layers, planned with torch.fx" in proc.stdout
    assert "RuntimeWarning" not in proc.stderr  # the module runs once
    data = json.loads(out.read_text())
    assert data["model"] == "test_benchmark_api:tiny" and data["input"] == [8] and data["pairs"] == 3
    assert math.isfinite(data["ratio"]) and data["layers"] == 2


@pytest.mark.parametrize("spec", ["resnet18", "torch.nn:NoSuchModel", "no_such_module:f", "timm:no_such_model_x"])
def test_command_line_refuses_a_bad_model_spec_with_the_accepted_forms(spec):
    proc = _cli(spec, "--input", "8")
    assert proc.returncode == 2
    assert "timm:NAME" in proc.stderr or "timm has no model" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_importing_the_module_keeps_tp_benchmark_callable():
    import target_param.benchmark as module

    assert callable(tp.benchmark) and callable(module)
    assert module(tiny(), torch.randn(32, 8), torch.randn(4, 8), steps=2, memory=False, flops=False,
                  progress=False).pairs == 2


# ------------------------------------------------------------------------------------------ the arithmetic
def test_quantile_interpolates_as_numpy_does():
    np = pytest.importorskip("numpy")
    from target_param.benchmark import quantile

    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 4, 7, 10):
        xs = torch.rand(n, generator=gen, dtype=torch.float64).tolist()
        for q in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0):
            assert quantile(xs, q) == pytest.approx(float(np.quantile(xs, q)), abs=1e-15)
    assert math.isnan(quantile([], 0.5))


def test_the_table_is_computed_from_the_measurements(monkeypatch):
    """Fixed timings, peak memories and FLOPs through stubs: every number of the result is the statistic it
    names (medians of the times, the median and IQR of the per-pair ratios, target over weight)."""
    import target_param.benchmark as bm

    times = {"weight": [1e-3, 2e-3, 3e-3, 10e-3], "target": [2e-3, 6e-3, 6e-3, 20e-3]}  # ratios 2, 3, 2, 2
    monkeypatch.setattr(bm, "interleaved_times", lambda steps, *a, **k: {n: list(times[n]) for n in steps})

    def space(make):
        model = make()[0]
        return "target" if tp.is_target_space(model) else "weight"
    monkeypatch.setattr(bm, "peak_memory", lambda make, *a: {"peak_bytes": {"weight": 2**20, "target": 3 * 2**20}[
        space(make)]})
    monkeypatch.setattr(bm, "flops_of", lambda make, *a: ({"weight": 100, "target": 450}[space(make)], {}))
    r = tp.benchmark(tiny(), torch.randn(32, 8), torch.randn(16, 8), steps=4, progress=False)
    assert r.weight_ms == pytest.approx(2.5) and r.target_ms == pytest.approx(6.0)  # medians, not means
    assert r.ratio == pytest.approx(2.0)  # the median of the per-pair ratios, not 6.0 / 2.5
    assert r.ratio_iqr == pytest.approx((2.0, 2.25))
    assert (r.weight_peak_mb, r.target_peak_mb, r.memory_ratio) == pytest.approx((1.0, 3.0, 3.0))
    assert r.flop_ratio == pytest.approx(4.5)


def test_every_command_line_option_reaches_benchmark(monkeypatch, capsys):
    import target_param.benchmark as bm

    seen = {}

    def stub(model, ref, batch, **kwargs):
        seen.update(kwargs, ref_shape=tuple(ref.shape), batch_shape=tuple(batch.shape), threads=torch.get_num_threads())
        return bm.BenchmarkResult(1.0, 2.0, 2.0, (2.0, 2.0), 2, plan="1 layers, planned with torch.fx")
    monkeypatch.setattr(bm, "benchmark", stub)
    threads = torch.get_num_threads()
    try:
        bm.main(["test_benchmark_api:tiny", "--input", "8", "--batch", "5", "--ref", "9", "--steps", "7",
                 "--lam", "0.25", "--lam-mode", "relative", "--max-positions", "3", "--threads", "2"])
    finally:
        torch.set_num_threads(threads)
    assert seen == dict(steps=7, lam=0.25, lam_mode="relative", max_positions=3, ref_shape=(9, 8),
                        batch_shape=(5, 8), threads=2)
    assert "(relative)" in capsys.readouterr().out
