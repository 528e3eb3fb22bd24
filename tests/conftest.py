import os

import pytest
import torch
from hypothesis import settings
from torch import nn

# CI (the CI environment variable, which .ci/run sets) draws the same hypothesis examples at every run, so a
# red CI is reproducible from its log and never a chance draw; local runs explore new examples each time.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

@pytest.fixture(autouse=True)
def _one_thread():
    """The suite is many tiny (often float64) problems: intra-op threads only add overhead, and thrash on
    a loaded 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]


class ShortcutMLP(nn.Module):
    """The paper's two-spirals shape: every layer sees the input and every earlier hidden layer."""

    def __init__(self, sizes=(2, 5, 5, 5, 2), act=torch.tanh):
        super().__init__()
        self.act = act
        widths = [sizes[0]]
        self.layers = nn.ModuleList()
        for out in sizes[1:]:
            self.layers.append(nn.Linear(sum(widths), out))
            widths.append(out)

    def forward(self, x):
        feats = [x]
        for lin in self.layers[:-1]:
            feats.append(self.act(lin(torch.cat(feats, 1))))
        return self.layers[-1](torch.cat(feats, 1))


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=3)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.conv2(x)) + x[:, :, ::2, ::2]
        return self.fc(self.drop(x).flatten(1))


def weight_space_maps(model: nn.Module) -> list[str]:
    """The linear maps left in weight space: Linear/Conv/ConvTranspose modules and nn.MultiheadAttention
    projections (bare Parameters) that are not parametrized."""
    import target_param as tp

    left = []
    for n, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and not tp.is_target_space(m):
            left.append(n)
        if isinstance(m, nn.MultiheadAttention):
            attrs = ["in_proj_weight"] if m._qkv_same_embed_dim else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
            left += [f"{n}.{a}" for a in attrs if a not in getattr(m, "parametrizations", {})]
    return left


def model_state(model: nn.Module):
    """Everything conversion may touch: classes, parameter identities and values, buffers, hooks."""
    return {
        "classes": [(n, type(m)) for n, m in model.named_modules()],
        "params": [(n, id(p), p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()],
        "buffers": [(n, b.detach().clone()) for n, b in model.named_buffers()],
        "state_keys": list(model.state_dict().keys()),
        "hooks": [(n, len(m._forward_pre_hooks), len(m._forward_hooks), len(m._forward_hooks_always_called),
                   len(m._forward_pre_hooks_with_kwargs), len(m._forward_hooks_with_kwargs))
                  for n, m in model.named_modules()],
        "dicts": [(n, sorted(vars(m))) for n, m in model.named_modules()],
    }


def assert_same_state(a, b):
    assert a["classes"] == b["classes"]
    assert a["state_keys"] == b["state_keys"]
    assert a["hooks"] == b["hooks"]
    assert a["dicts"] == b["dicts"]
    assert [(n, i, r) for n, i, _, r in a["params"]] == [(n, i, r) for n, i, _, r in b["params"]]
    for (_, _, x, _), (_, _, y, _) in zip(a["params"], b["params"]):
        assert torch.equal(x, y)
    assert [n for n, _ in a["buffers"]] == [n for n, _ in b["buffers"]]
    for (_, x), (_, y) in zip(a["buffers"], b["buffers"]):
        assert torch.equal(x, y)
