"""A Hugging Face causal LM trained in target space and in weight space, with gradient checkpointing on.

A tiny GPT-2 or Llama (random initialisation from a config; no hub) learns the characters of a text that
ships with Python (the Zen of Python, ``import this``): next-character prediction on windows of
``--context`` characters. Both spaces start from the same weights, see the same minibatches, and use Adam
with the same learning rate. The target-space model is converted with one call on a reference batch of
``--n-ref`` windows; its Conv1D (GPT-2) or Linear (Llama) layers are recomputed from their targets at every
step. Written to ``--out``: ``hf_finetune.json`` (losses per step, held-out loss, seconds) and
``hf_finetune.png``.

    python examples/hf_finetune.py --model gpt2 --steps 300
    python examples/hf_finetune.py --quick --out /tmp/hf      # a smoke test (CI)
"""
from __future__ import annotations

import argparse
import codecs
import copy
import json
import sys
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import target_param as tp  # noqa: E402


def corpus() -> str:
    """The Zen of Python (``this.s``, rot13), imported without printing it."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        import this
    return codecs.decode(this.s, "rot13")


def checkpointing_on(model, reentrant: bool = False) -> None:
    """The model's own activation checkpointing (transformers ≥ 5.x names it activation_checkpointing_enable;
    gradient_checkpointing_enable before)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})


def build(name: str, vocab: int, context: int, width: int, layers: int):
    import transformers

    if name == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab, n_embd=width, n_layer=layers, n_head=4,
                                         n_positions=context, bos_token_id=0, eos_token_id=0,
                                         tie_word_embeddings=False)
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=context, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=["gpt2", "llama"], default="gpt2")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=32)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--n-ref", type=int, default=32, help="reference windows (n̄ × context columns per layer)")
    p.add_argument("--lam", type=float, default=1e-3)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("out/hf_finetune"))
    p.add_argument("--quick", action="store_true", help="8 steps, a 1-layer model: a smoke test")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.layers, args.batch, args.n_ref = 8, 1, 4, 8
    torch.manual_seed(args.seed)
    text = corpus()
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text])
    split = int(0.9 * len(data))
    train, held = data[:split], data[split:]

    def windows(source, n, gen):
        start = torch.randint(len(source) - args.context - 1, (n,), generator=gen)
        idx = start[:, None] + torch.arange(args.context + 1)
        return source[idx]
    gen = torch.Generator().manual_seed(args.seed)
    ref = windows(train, args.n_ref, gen)[:, :-1]
    weight = build(args.model, len(chars), args.context, args.width, args.layers)
    target = copy.deepcopy(weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tp.TraceFallbackWarning)  # transformers models are planned by hooks
        tp.to_target_space(target, ref, lam=args.lam)
    runs = {}
    for space, model in (("weight", weight), ("target", target)):
        model.train()
        model.config.use_cache = False
        checkpointing_on(model)
        opt = torch.optim.Adam(model.parameters(), args.lr)
        g = torch.Generator().manual_seed(args.seed + 1)
        losses, t0 = [], time.perf_counter()
        for _ in tqdm(range(args.steps), desc=f"{args.model} in {space} space", file=sys.stdout, dynamic_ncols=True):
            w = windows(train, args.batch, g)
            opt.zero_grad(set_to_none=True)
            logits = model(input_ids=w[:, :-1]).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            losses.append(round(loss.item(), 4))
        seconds = time.perf_counter() - t0
        model.eval()
        with torch.no_grad():
            w = windows(held, 64, torch.Generator().manual_seed(99))
            logits = model(input_ids=w[:, :-1]).logits
            held_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1)).item()
        runs[space] = {"losses": losses, "held_out_loss": round(held_loss, 4), "seconds": round(seconds, 2)}
        print(f"{space}: final training loss {losses[-1]:.3f}, held-out {held_loss:.3f}, {seconds:.1f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: v if not isinstance(v, Path) else str(v) for k, v in vars(args).items()}
    (args.out / "hf_finetune.json").write_text(json.dumps({"settings": settings, "runs": runs,
                                                            "torch": torch.__version__}, indent=1))
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for space, colour in (("weight", "C0"), ("target", "C3")):
        ax.plot(runs[space]["losses"], color=colour, label=f"{space} (held-out {runs[space]['held_out_loss']:.2f})")
    ax.set_xlabel("Adam step")
    ax.set_ylabel("training loss (nats/char)")
    ax.set_title(f"tiny {args.model}, next character, gradient checkpointing on")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "hf_finetune.png", dpi=110)
    plt.close(fig)
    return runs


if __name__ == "__main__":
    main()
