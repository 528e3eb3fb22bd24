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


def gpt2():
    return transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=16, num_labels=3, pad_token_id=0,
        bos_token_id=1, eos_token_id=1))


MODELS = {"llama": llama, "bert": bert, "gpt2": gpt2}


def checkpointing_on(model, reentrant: bool) -> None:
    """The model's own activation checkpointing, by the current name (transformers 5: activation_...)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})


def converted(make, mode="train", lam=1e-3):
    torch.manual_seed(0)
    model = make().to(DT)
    getattr(model, mode)()
    ref = torch.randint(1, VOCAB, (12, 8))  # 96 columns: every layer's Gram full rank (d_in + 1 ≤ 65)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        original = copy.deepcopy(model)
        tp.to_target_space(model, ref, lam=lam)
    return model, original, ref


def logits(model, ids):
    return model(input_ids=ids).logits


@pytest.mark.parametrize("name", MODELS)
def test_conversion_keeps_the_function_and_converts_every_linear_layer(name):
    # (λ = 1e-8: GPT-2's inputs after LayerNorm are centred, so A has a null row combination and a smaller λ
    # loses float64 digits in the near-singular solve)
    model, original, ref = converted(MODELS[name], mode="eval", lam=1e-8)
    maps = (nn.Linear, transformers.pytorch_utils.Conv1D)
    left = [n for n, m in model.named_modules() if isinstance(m, maps) and not tp.is_target_space(m)]
    assert not left, left
    with torch.no_grad():
        y, want = logits(model, ref), logits(original, ref)
    assert ((y - want).norm() / want.norm()).item() < 5e-6


@pytest.mark.parametrize("name,layer", [("llama", "model.layers.1.mlp.down_proj"),
                                        ("bert", "bert.encoder.layer.1.output.dense"),
                                        ("gpt2", "transformer.h.1.mlp.c_proj")])
def test_eq6_at_one_layer_on_the_input_of_its_call(name, layer):
    """``[W b] = T Aᵀ(AAᵀ + λI)⁻¹`` in float64, with ``A`` the input the layer received in the reference pass
    (a forward pre-hook's first call); GPT-2's Conv1D stores ``W`` transposed, (d_in, d_out)."""
    lam = 1e-3
    model, _, ref = converted(MODELS[name], mode="eval", lam=lam)
    module, seen = model.get_submodule(layer), {}
    handle = module.register_forward_pre_hook(lambda m, args: seen.setdefault("a", args[0].detach()))
    with torch.no_grad():
        model(input_ids=ref)
    handle.remove()
    a = seen["a"].reshape(-1, seen["a"].shape[-1])
    t = module.parametrizations.weight.original.detach()
    t = t.reshape(-1, t.shape[-1])
    if module.bias is not None:
        a = torch.cat([a, torch.ones(len(a), 1, dtype=DT)], 1)
    want = torch.linalg.solve(a.T @ a + lam * torch.eye(a.shape[1], dtype=DT), a.T @ t).T
    w = module.weight.detach()
    w = w.T if isinstance(module, transformers.pytorch_utils.Conv1D) else w
    got = w if module.bias is None else torch.cat([w, module.bias.detach()[:, None]], 1)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_gpt2_lm_head_is_refused_for_its_tie_and_converts_with_the_way_out():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=16,
                                     bos_token_id=1, eos_token_id=1)
    model, ref = transformers.GPT2LMHeadModel(config), torch.randint(1, VOCAB, (12, 8))
    with pytest.raises(tp.LayerReusedError, match=r"'lm_head'[\s\S]*filter_fn"):
        tp.to_target_space(model, ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tp.TraceFallbackWarning)
        tp.to_target_space(model, ref, filter_fn=lambda m, n: n != "lm_head")
    conv1d = [m for m in model.modules() if isinstance(m, transformers.pytorch_utils.Conv1D)]
    assert len(conv1d) == 4 and all(tp.is_target_space(m) for m in conv1d)
    model(ref).logits.sum().backward()
    plain = tp.to_weight_space(model)
    assert all(type(m) is transformers.pytorch_utils.Conv1D for m in conv1d) and "lm_head.weight" in plain.state_dict()


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("name", MODELS)
def test_gradient_checkpointing_gives_the_unchecked_gradients(name, reentrant):
    """Two SGD steps in train mode (dropout on), the twin with ``gradient_checkpointing_enable()``: the same
    target gradients, step by step."""
    base, _, _ = converted(MODELS[name])
    twin = copy.deepcopy(base)
    checkpointing_on(twin, reentrant)
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


def test_albert_shared_layers_are_refused_once_all_listed_and_the_way_out_converts_the_rest():
    """ALBERT runs one layer group at every depth: every shared layer is named in one refusal, whose filter_fn
    converts the rest (embedding projection, pooler, classifier)."""
    torch.manual_seed(0)
    model = transformers.AlbertForSequenceClassification(transformers.AlbertConfig(
        vocab_size=VOCAB, embedding_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=2))
    ref = torch.randint(1, VOCAB, (12, 8))
    with pytest.raises(tp.LayerReusedError) as info:
        tp.to_target_space(model, ref)
    shared = info.value.values["layers"]
    assert len(shared) == 6 and all(calls == 2 for calls in shared.values())  # q, k, v, dense, ffn, ffn_output
    assert all(f"'{n}'" in str(info.value) for n in shared)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tp.TraceFallbackWarning)
        tp.to_target_space(model, ref, filter_fn=lambda m, n: n not in shared)
    assert tp.is_target_space(model.classifier) and not tp.is_target_space(model.get_submodule(next(iter(shared))))


@pytest.mark.parametrize("name", MODELS)
def test_weight_space_state_dict_round_trips_through_save_pretrained(name, tmp_path):
    """``save_pretrained(path, state_dict=tp.weight_space_state_dict(model))`` of a model trained in target
    space; ``from_pretrained(path)`` gives a plain model with the same outputs; the converted model is
    unchanged (its targets, its realisation count)."""
    model, _, _ = converted(MODELS[name])
    opt = torch.optim.SGD(model.parameters(), 1e-2)
    model(input_ids=torch.randint(1, VOCAB, (3, 8))).logits.pow(2).mean().backward()
    opt.step()
    model.eval()
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    sd = tp.weight_space_state_dict(model)
    assert {n: p for n, p in model.named_parameters()}.keys() == state.keys()
    assert all(torch.equal(p, state[n]) for n, p in model.named_parameters())
    model.save_pretrained(tmp_path, state_dict=sd)
    plain = type(model).from_pretrained(tmp_path, torch_dtype=DT).eval()
    ids = torch.randint(1, VOCAB, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, logits(model, ids), rtol=1e-10, atol=1e-12)
    assert not tp.is_target_space(plain)


def test_mixtral_experts_stay_in_weight_space_named():
    """Mixtral's experts are 3-D Parameters indexed per expert by data-dependent routing: they stay in weight
    space, named with the op in the warning and in explain; every nn.Linear converts."""
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=16,
        tie_word_embeddings=False))
    ref = torch.randint(1, VOCAB, (12, 8))
    assert "experts.gate_up_proj: computed with by" in str(tp.explain(model, ref))
    with pytest.warns(tp.WeightSpaceWarning) as caught:
        tp.to_target_space(model, ref)
    message = "\n".join(str(w.message) for w in caught if issubclass(w.category, tp.WeightSpaceWarning))
    assert "experts.gate_up_proj" in message and "experts.down_proj" in message
    left = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not tp.is_target_space(m)]
    assert not left, left
    model(input_ids=ref[:2]).logits.sum().backward()
