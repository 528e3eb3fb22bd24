"""Hugging Face ``transformers`` models built from tiny configs (no hub): conversion keeps the function, training
with the model's own gradient checkpointing (``gradient_checkpointing_enable()``, reentrant or not) gives the
unchecked model's gradients, and frozen weights (PEFT LoRA's base layers) stay in weight space, bit-unchanged.

torch.fx cannot trace these models, so they take the hook path: the reference pass runs the model's eager
forward, its checkpoint calls included, which run plainly there (``recompute.checkpointing_off``).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import target_param as tp

transformers = pytest.importorskip("transformers")
DT = torch.float64
VOCAB = 40


def llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16, tie_word_embeddings=False, attention_dropout=0.1))


def bert():
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.1))


MODELS = {"llama": llama, "bert": bert}


def converted(make, mode="train", lam=1e-3):
    torch.manual_seed(0)
    model = make().to(DT)
    getattr(model, mode)()
    ref = torch.randint(1, VOCAB, (6, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        original = copy.deepcopy(model)
        tp.to_target_space(model, ref, lam=lam)
    return model, original, ref


def logits(model, ids):
    return model(input_ids=ids).logits


@pytest.mark.parametrize("name", MODELS)
def test_conversion_keeps_the_function_and_converts_every_linear_layer(name):
    model, original, ref = converted(MODELS[name], mode="eval", lam=1e-12)
    left = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not tp.is_target_space(m)]
    assert not left, left
    with torch.no_grad():
        torch.testing.assert_close(logits(model, ref), logits(original, ref), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("name", MODELS)
def test_gradient_checkpointing_gives_the_unchecked_gradients(name, reentrant):
    """Two SGD steps in train mode (dropout on), the twin with ``gradient_checkpointing_enable()``: the same
    target gradients, step by step."""
    base, _, _ = converted(MODELS[name])
    twin = copy.deepcopy(base)
    twin.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    twin.config.use_cache = False
    base.config.use_cache = False
    opts = [torch.optim.SGD(m.parameters(), 1e-2) for m in (base, twin)]
    for step in range(2):
        ids = torch.randint(1, VOCAB, (3, 8))
        grads = []
        for m, opt in zip((base, twin), opts):
            opt.zero_grad()
            torch.manual_seed(10 + step)
            emb = m.get_input_embeddings()(ids)
            if reentrant:  # (reentrant checkpointing needs an input that requires grad, as HF arranges)
                emb.requires_grad_(True)
            m(inputs_embeds=emb).logits.pow(2).mean().backward()
            grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
        assert grads[0].keys() == grads[1].keys()
        for n in grads[0]:
            torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-6, atol=1e-9, msg=lambda s, n=n: f"{n}: {s}")
        for opt in opts:
            opt.step()


def test_frozen_weights_stay_in_weight_space_named():
    """A layer whose weight is frozen at conversion keeps its weight: converting it would freeze its target, and
    W = T·A^‡ moves with the layers before it. The warning and ``explain`` name it."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2))
    net[2].weight.requires_grad_(False)
    ref = torch.randn(30, 4)
    assert "2: frozen (requires_grad=False)" in str(tp.explain(net, ref))
    with pytest.warns(tp.WeightSpaceWarning, match=r"2: frozen \(requires_grad=False\)"):
        tp.to_target_space(net, ref)
    assert not tp.is_target_space(net[2]) and tp.is_target_space(net[0]) and tp.is_target_space(net[4])


def test_peft_lora_base_weights_are_bit_unchanged_and_the_adapters_train_in_target_space():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(llama(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                         lora_dropout=0.0, init_lora_weights=False))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    ref = torch.randint(1, VOCAB, (6, 8))
    with pytest.warns(tp.WeightSpaceWarning, match="base_layer: frozen"):
        tp.to_target_space(model, ref, lam=1e-3)
    lora = [n for n, m in model.named_modules() if "lora_" in n and isinstance(m, nn.Linear)]
    assert lora and all(tp.is_target_space(model.get_submodule(n)) for n in lora)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], 1e-2)
    before = {n: model.get_submodule(n).weight.detach().clone() for n in lora}
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=torch.randint(1, VOCAB, (3, 8))).logits.pow(2).mean().backward()
        opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(model.get_submodule(n).weight, before[n]) for n in lora)
