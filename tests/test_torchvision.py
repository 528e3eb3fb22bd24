"""Real-world coverage: every torchvision classification builder (weights=None) converted with one call.

For each model (float32, the reference batch X̄ of N_REF random images at the smallest input the model
takes, see ``SIZES``):

0. A layer whose weight the builder sets to zero (ViT's head) is drawn from N(0, 0.01²) instead, so that
   the output is not zero. The BatchNorm statistics are those of X̄, as a trained model's are of its data:
   each BatchNorm is reset and fed X̄ once in train mode with ``momentum=None`` (an exact batch average),
   then the model is put in eval mode.
1. Either ``tp.to_target_space(model, X̄, lam=LAM, init="project")`` converts it and its eval output on X̄
   stays within ``RTOL`` (relative) of the output before conversion, or it raises a named
   ``tp.TargetSpaceError`` and the model is untouched (``conftest.assert_same_state``). Any other exception
   is a library bug.
2. Three Adam steps in *train* mode (as a user trains: BatchNorm on batch statistics both in the reference
   pass and in the training forward, dropout / stochastic depth on, googlenet's and inception's auxiliary
   heads in the loss) on a minibatch that is not X̄ (the general two-pass path): every loss is finite and
   every target changes.
3. ``tp.to_weight_space`` gives back the same module classes and state_dict keys as before conversion, with
   the converted model's realised weights (bitwise) as plain parameters.

A representative subset (one small model per family, ``CI_MODELS``) runs by default. The whole list:

    TP_ALL_TORCHVISION=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_torchvision.py

and, to write per-model records (status, times, peak memory, each model in its own process) as JSON:

    .venv/bin/python tests/test_torchvision.py [--out /tmp/torchvision_results.json] [--timeout 900] \
        [--mem-gb 16] [names...]
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
import traceback
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import target_param as tp

torchvision = pytest.importorskip("torchvision")
sys.path.insert(0, os.path.dirname(__file__))
from conftest import assert_same_state, model_state, weight_space_maps  # noqa: E402

N_REF = 8          # reference batch size n̄ (as tests/test_timm.py)
N_CLASSES = 10
# init="project" keeps the output on X̄ exactly as λ → 0 (eq. 13). At λ ≤ 1e-4 the float32 change no longer
# depends on λ (vgg11: 1.2e-4 at λ = 0, 1e-8, 1e-6, 1e-4; 3.7e-3 at λ = 1e-2): it is rounding, up to 1.5e-4
# over all 74 converting models at λ = 1e-6 (vgg19, no BatchNorm), median 9e-7. RTOL leaves ~6× over that
# worst case and still catches a projection error of λ = 1e-2's size.
LAM = 1e-6
RTOL = 1e-3
ALL = sorted(torchvision.models.list_models(module=torchvision.models))
CI_MODELS = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "squeezenet1_1", "shufflenet_v2_x0_5",
             "mnasnet0_5", "regnet_y_400mf", "efficientnet_b0", "densenet121", "googlenet", "convnext_tiny",
             "alexnet", "vit_b_32", "swin_t", "maxvit_t"]

# The smallest input each builder takes: 32×32 unless listed. alexnet's three stride-2 max-pools after its
# stride-4 stem need 63+; inception_v3's auxiliary head (train mode) needs a 17×17 Mixed_6e map, i.e. 299;
# maxvit's 7×7 partitions need a 7-divisible grid at stride 32, i.e. 224 (partition_size is fixed by
# maxvit_t). ViTs take ``image_size``: two patches per side.
SIZES = {"alexnet": 64, "inception_v3": 299, "maxvit_t": 224}


def _size_and_kwargs(name):
    if name.startswith("vit_"):
        patch = int(name.rsplit("_", 1)[1])
        return 2 * patch, {"image_size": 2 * patch}
    return SIZES.get(name, 32), {}


def _family(name):
    """torchvision's module of the builder: resnet (with resnext, wide_resnet), vision_transformer, ..."""
    return torchvision.models.get_model_builder(name).__module__.rsplit(".", 1)[1]


def create(name):
    """The model (seeded, weights=None, 10 classes), its reference batch, BatchNorm stats set from it, eval."""
    size, kw = _size_and_kwargs(name)
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=N_CLASSES, **kw)
    for m in model.modules():  # ViT's head starts at zero: an all-zero output would make step 1 vacuous
        if isinstance(m, (nn.Linear, nn.Conv2d)) and not m.weight.any():
            nn.init.normal_(m.weight, std=0.01)
    ref = torch.randn(N_REF, 3, size, size)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: after one batch, exactly that batch's statistics
    model.train()
    with torch.no_grad():
        model(ref)
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    return model.eval(), ref


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _loss(out, y):
    outs = [out] if isinstance(out, torch.Tensor) else [o for o in out if isinstance(o, torch.Tensor)]
    return sum(F.cross_entropy(o, y) for o in outs)


def _targets(model):
    """Every target: ``parametrizations.<tensor>.original`` (and ``original<k>`` of row-block units)."""
    return {n: p for n, p in model.named_parameters() if ".parametrizations." in n and ".original" in n}


def check(name, rec=None):
    """Run steps 0-3 on one model, filling and returning ``rec``. Raises on a failed check or on a raw
    (not a ``tp.TargetSpaceError``) exception; ``rec`` then holds what was measured up to there."""
    rec = {} if rec is None else rec
    rec.update(model=name, family=_family(name))
    t0 = time.perf_counter()
    model, ref = create(name)
    rec["size"], rec["n_ref"] = ref.shape[-1], N_REF
    rec["params_M"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    with torch.no_grad():
        y0 = model(ref)
    keys, classes = list(model.state_dict()), [(n, type(m)) for n, m in model.named_modules()]
    before = model_state(model)
    rec["t_create"] = round(time.perf_counter() - t0, 2)

    # 1. convert (or be refused by name, untouched)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            tp.to_target_space(model, ref, lam=LAM, init="project")
        except tp.TargetSpaceError as err:
            rec["t_convert"] = round(time.perf_counter() - t0, 2)
            rec["status"] = f"refused by {type(err).__name__}"
            rec["message"] = str(err).splitlines()[0]
            assert_same_state(before, model_state(model))
            return rec
    rec["t_convert"] = round(time.perf_counter() - t0, 2)
    rec["warnings"] = sorted({w.category.__name__ if w.category.__module__.startswith("target_param")
                              else f"{w.category.__name__}: {str(w.message)[:120]}" for w in caught})
    targets = _targets(model)
    rec["converted_layers"] = len(targets)
    rec["weight_space_maps"] = weight_space_maps(model)
    if rec["family"] in ATTENTION_FAMILIES:
        assert not rec["weight_space_maps"], f"left in weight space: {rec['weight_space_maps']}"
    with torch.no_grad():
        y1 = model(ref)
    rec["rel_out"] = rel(y1, y0)
    assert torch.isfinite(y1).all()
    assert rec["rel_out"] < RTOL, f"output on X̄ changed by {rec['rel_out']:.3g} (RTOL {RTOL})"

    # 2. three Adam steps in train mode on a minibatch that is not X̄
    t0 = time.perf_counter()
    start = {n: p.detach().clone() for n, p in targets.items()}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(ref.shape, generator=g)
    y = torch.randint(0, N_CLASSES, (N_REF,), generator=g)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    model.train()
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = _loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    rec["t_train"] = round(time.perf_counter() - t0, 2)
    rec["losses"] = [round(v, 4) for v in losses]
    assert all(map(torch.isfinite, map(torch.tensor, losses))), losses
    unchanged = [n for n, p in _targets(model).items() if torch.equal(p.detach(), start[n])]
    rec["targets_unchanged"] = unchanged
    assert not unchanged, f"{len(unchanged)}/{len(start)} targets did not change: {unchanged[:5]}"

    # 3. back to weight space: the realised weights stay, as plain parameters
    mods = {n: m for n, m in model.named_modules() if "parametrizations" in m._modules}
    with torch.no_grad():
        y2 = model(ref)
        realised = {f"{n}.{t}": getattr(m, t).clone() for n, m in mods.items() for t in m.parametrizations}
    tp.to_weight_space(model)
    assert list(model.state_dict()) == keys
    assert [(n, type(m)) for n, m in model.named_modules()] == classes
    params = dict(model.named_parameters())
    assert all(torch.equal(params[k], w) for k, w in realised.items())
    with torch.no_grad():
        y3 = model(ref)
    # Not asserted: the same weights, but Linear weights were views of Wᵀ and are now contiguous, so the
    # kernels round differently, and after training with a tiny λ a model can amplify that (maxvit_t: 1e-7
    # relative noise on its weights moves its output by 4%).
    rec["rel_back"] = rel(y3, y2)
    assert torch.isfinite(y3).all()
    rec["status"] = "converts"
    return rec


# The attention families must convert every linear map: torchvision's Swin passes its attention Linears' weights
# to shifted_window_attention, ViT's nn.MultiheadAttention its bare in_proj_weight and out_proj's weight to
# F.multi_head_attention_forward (see target_param.functional). Refused by name, and left untouched: Swin V2,
# whose attention clones the qkv bias and zeroes its key rows in place (Tensor.zero_) before F.linear.
REFUSED = {n: "FunctionalWeightUseError" for n in ALL if n.startswith("swin_v2_")}
ATTENTION_FAMILIES = ("vision_transformer", "swin_transformer", "maxvit")


@pytest.mark.filterwarnings("ignore::target_param.RankDeficientWarning",  # expected at n̄ = 8 and λ = 1e-6
                            "ignore::target_param.IllConditionedWarning")
@pytest.mark.parametrize("name", ALL if os.environ.get("TP_ALL_TORCHVISION") else CI_MODELS)
def test_torchvision_model(name):
    rec = check(name)
    assert rec["status"] == (f"refused by {REFUSED[name]}" if name in REFUSED else "converts"), rec


def _one(name):
    """Child process: one record as a JSON line on stdout, failures included."""
    torch.set_num_threads(1)
    t0, rec = time.perf_counter(), {}
    try:
        check(name, rec)
    except AssertionError as err:
        rec.update(status="CHECK FAILED", error=str(err)[:500],
                   traceback=traceback.format_exc().strip().splitlines()[-6:])
    except Exception as err:  # noqa: BLE001  a raw exception: a library bug (or a harness one)
        rec.update(status="BUG", error_type=type(err).__name__,
                   error=str(err).strip().splitlines()[-1][:500] if str(err).strip() else "",
                   traceback=traceback.format_exc().strip().splitlines()[-8:])
    rec["t_total"] = round(time.perf_counter() - t0, 2)
    rec["max_rss_GB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    print("@@RESULT " + json.dumps(rec), flush=True)


def main(argv):
    if argv[:1] == ["--one"]:
        return _one(argv[1])
    opts = {"--out": "/tmp/torchvision_results.json", "--timeout": "900", "--mem-gb": "16"}
    while argv and argv[0] in opts:
        opts[argv[0]], argv = argv[1], argv[2:]
    out, timeout, mem = opts["--out"], int(opts["--timeout"]), int(opts["--mem-gb"]) * 2**30

    def limit():  # address-space cap per child, so that a huge model fails alone instead of swapping
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    names = argv or ALL
    results = json.load(open(out)) if os.path.exists(out) else {}
    for name in names:
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True,
                                  timeout=timeout, preexec_fn=limit)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULT ")]
            rec = json.loads(lines[-1][9:]) if lines else {
                "model": name, "family": _family(name), "status": "CRASHED", "returncode": proc.returncode,
                "error": proc.stderr.strip().splitlines()[-1:] if proc.stderr.strip() else ""}
        except subprocess.TimeoutExpired:
            rec = {"model": name, "family": _family(name), "status": f"TIMEOUT after {timeout} s"}
        rec["wall"] = round(time.perf_counter() - t0, 1)
        results[name] = rec
        print(f"{name:22s} {rec['status']:40s} rel={rec.get('rel_out', '-')} wall={rec['wall']}"
              f" rss={rec.get('max_rss_GB', '-')}", flush=True)
        with open(out + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(out + ".tmp", out)


if __name__ == "__main__":
    main(sys.argv[1:])
