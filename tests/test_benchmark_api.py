"""``tp.benchmark`` and ``python -m target_param.benchmark``: they run, measure what they say (FLOPs against a
count by hand, parameter totals against a converted copy), leave the model alone, and refuse a bad model
spec with the accepted forms (no timing thresholds)."""
import json
import math
import os
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
