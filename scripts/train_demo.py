#!/usr/bin/env python
"""Train the bundled demo model (offload/demo): a small MiMo-V2-Flash MoE with one MTP layer.

What it builds, end to end, with no network:
  1. a byte-level BPE tokenizer (`tokenizers`, digits split one per token, 512 ids) trained on generated
     chats, saved as a `PreTrainedTokenizerFast` with role tokens and a Jinja chat template;
  2. `transformers.MiMoV2FlashForCausalLM` from a small `MiMoV2FlashConfig` (6 layers, 5:1 sliding/full
     hybrid, sinks on the sliding layers, dense layer 0, 16 routed experts top-2 behind a sigmoid router
     with a correction bias that is tuned by DeepSeek-V3's auxiliary-loss-free balancing);
  3. one DeepSeek-V3-style MTP layer (`MTPLayer` below) trained jointly to predict token t+2 from the
     main model's final (normed) hidden state at t and the embedding of token t+1, sharing the embedding
     and the LM head; saved under `model.mtp.layers.0.*` in the layout of the real MiMo-V2-Flash checkpoints;
  4. data: verifiable reasoning chats of 1-4 turns in varied phrasings from `offload.demo.tasks`, generated
     on the fly from --seed; every reply of a chat is learned; held-out questions (`tasks.is_heldout`) and
     held-out phrasings (`tasks.UNSEEN`) never enter the training stream.
  With --init DIR it fine-tunes DIR's checkpoint (weights, MTP layer, tokenizer) instead.

The learning-rate schedule (linear warm-up, cosine decay to 10%) runs on wall-clock time so the run ends
after --minutes whatever the load on the machine. The checkpoint is written to a temporary directory next
to --out and its files are then renamed into --out (which may already hold other files, e.g. tasks.py).
At the end the saved checkpoint is reloaded with transformers and measured: greedy exact match on the
held-out first turns, later turns and unseen phrasings (`offload.demo.evaluation`, transformers `generate`) and
the MTP layer's first-draft acceptance under greedy decoding.

    .venv/bin/python scripts/train_demo.py                               # from scratch, 42 min (writes offload/demo)
    .venv/bin/python scripts/train_demo.py --minutes 3 --out /tmp/demo    # a quick smoke run
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from offload.demo import tasks  # noqa: E402

SPECIALS = {"pad": "<|pad|>", "bos": "<|bos|>", "eos": "<|end|>"}
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
VOCAB = 512
# The training mix (tasks.KINDS order: add sub mul compare sort count word chain): more steps for the kinds
# the model learns last (sorting, counting, chains) than the evaluation mix (tasks.WEIGHTS) gives them.
TRAIN_WEIGHTS = (3, 3, 2, 2, 4, 3, 2, 3)
MAX_NEW_TOKENS = 48


SIZES = {  # hidden, dense/MTP intermediate, expert intermediate, head_dim, v_head_dim
    "small": (128, 256, 64, 32, 32),
    "base": (192, 384, 96, 48, 32),
}


def model_config(vocab_size: int, bos: int, eos: int, pad: int, size: str = "small"):
    from transformers import MiMoV2FlashConfig

    hidden, inter, moe_inter, head_dim, v_head_dim = SIZES[size]
    return MiMoV2FlashConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=inter, moe_intermediate_size=moe_inter,
        num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=1, head_dim=head_dim,
        v_head_dim=v_head_dim,
        n_routed_experts=16, num_experts_per_tok=2, norm_topk_prob=True, routed_scaling_factor=1.0,
        sliding_window=64, max_position_embeddings=512, attention_value_scale=0.707, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
        initializer_range=0.02,
    )


# ----------------------------------------------------------------------------------------- tokenizer
def build_tokenizer(seed: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed + 7)
    corpus = [f"{q}\n{a}" for _, q, a in tasks.make_tasks(rng, 20000) if not tasks.is_heldout(q)]
    corpus += [*tasks.SYSTEM_PROMPTS, tasks.REFUSAL, "Hello! How are you?"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    specials = [SPECIALS["pad"], SPECIALS["bos"], SPECIALS["eos"], *ROLE_TOKENS]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIALS["bos"], eos_token=SPECIALS["eos"], pad_token=SPECIALS["pad"],
        additional_special_tokens=ROLE_TOKENS, chat_template=CHAT_TEMPLATE, model_max_length=512,
        padding_side="left", clean_up_tokenization_spaces=False)


def encode_chat(tokenizer, turns: list[tuple[str, str, str]],
                system: str | None = None) -> tuple[list[int], list[bool]]:
    """Token ids of a whole chat as the chat template renders it, and which ids are learned (every
    assistant reply and its end token). Every piece boundary is a special token, so piecewise encoding
    equals encoding the rendered chat (checked by tests/test_demo.py)."""
    def enc(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    ids, learn = [tokenizer.bos_token_id], [False]
    if system:
        ids += enc(f"<|system|>{system}{SPECIALS['eos']}")
    for _, q, a in turns:
        prompt = enc(f"<|user|>{q}{SPECIALS['eos']}<|assistant|>")
        reply = enc(a + SPECIALS["eos"])
        ids += prompt + reply
        learn += [False] * (len(ids) - len(learn) - len(reply)) + [True] * len(reply)
    return ids, learn


# ----------------------------------------------------------------------------------------- MTP layer
class MTPLayer(nn.Module):
    """DeepSeek-V3 / MiMo-V2-Flash multi-token prediction layer. At position t it reads the main model's
    final hidden state h_t (after `model.norm`, the state the LM head sees) and the embedding of token t+1:
        x = eh_proj(cat[enorm(embed(tok_{t+1})), hnorm(h_t)])
        x = x + self_attn(input_layernorm(x))        # one sliding-window layer with sinks, causal over t
        x = x + mlp(post_attention_layernorm(x))     # dense SwiGLU, config.intermediate_size
        logits_{t+2} = lm_head(final_layernorm(x))   # embedding and LM head shared with the main model
    Parameter names match the checkpoint names under `model.mtp.layers.0.` (the attention sink, `sinks`
    here as in transformers, is stored as `self_attn.attention_sink_bias` as real checkpoints do)."""

    def __init__(self, config) -> None:
        super().__init__()
        from transformers.models.mimo_v2_flash.modeling_mimo_v2_flash import (
            MiMoV2FlashAttention,
            MiMoV2FlashMLP,
            MiMoV2FlashRMSNorm,
        )

        h, eps = config.hidden_size, config.rms_norm_eps
        sliding = config.layer_types.index("sliding_attention")
        self.enorm, self.hnorm = MiMoV2FlashRMSNorm(h, eps), MiMoV2FlashRMSNorm(h, eps)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.self_attn = MiMoV2FlashAttention(config, layer_idx=sliding)
        self.mlp = MiMoV2FlashMLP(config)
        self.input_layernorm = MiMoV2FlashRMSNorm(h, eps)
        self.post_attention_layernorm = MiMoV2FlashRMSNorm(h, eps)
        self.final_layernorm = MiMoV2FlashRMSNorm(h, eps)
        std = config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
        nn.init.normal_(self.self_attn.sinks, std=std)

    def forward(self, hidden: torch.Tensor, next_embeds: torch.Tensor, position_embeddings, mask) -> torch.Tensor:
        x = self.eh_proj(torch.cat([self.enorm(next_embeds), self.hnorm(hidden)], dim=-1))
        x = x + self.self_attn(self.input_layernorm(x), position_embeddings, mask)[0]
        x = x + self.mlp(self.post_attention_layernorm(x))
        return self.final_layernorm(x)

    def checkpoint_state(self, prefix: str = "model.mtp.layers.0.") -> dict[str, torch.Tensor]:
        return {prefix + k.replace("self_attn.sinks", "self_attn.attention_sink_bias"): v.detach().clone()
                for k, v in self.state_dict().items()}

    def load_checkpoint_state(self, tensors: dict[str, torch.Tensor], prefix: str = "model.mtp.layers.0.") -> None:
        state = {k[len(prefix):].replace("self_attn.attention_sink_bias", "self_attn.sinks"): v
                 for k, v in tensors.items() if k.startswith(prefix)}
        self.load_state_dict(state, strict=True)


def masks_and_rope(model, embeds: torch.Tensor, position_ids: torch.Tensor):
    """The sliding-window causal mask and the sliding-layer RoPE exactly as the main model builds them."""
    from transformers.masking_utils import create_sliding_window_causal_mask

    mask = create_sliding_window_causal_mask(config=model.config, inputs_embeds=embeds, attention_mask=None,
                                             past_key_values=None, position_ids=position_ids)
    rope = model.model.rotary_emb(embeds, position_ids, "sliding_attention")
    return mask, rope


def mtp_logits(model, mtp: MTPLayer, input_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Logits for tokens t+2, t = 0..T-2, from hidden [B, T, H] and input_ids [B, T] -> [B, T-1, V]."""
    next_embeds = model.model.embed_tokens(input_ids[:, 1:])
    h = hidden[:, :-1]
    pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
    mask, rope = masks_and_rope(model, h, pos)
    return model.lm_head(mtp(h, next_embeds, rope, mask))


# ----------------------------------------------------------------------------------------- data
def batches(tokenizer, seed: int, batch_size: int, pad_id: int):
    """Endless (input_ids, labels) batches of 1-4-turn chats (no held-out question): a pool of 16 batches is
    sorted by length so padding stays small."""
    rng = random.Random(seed)
    while True:
        pool = []
        while len(pool) < 16 * batch_size:
            system, turns = tasks.make_conversation(rng, TRAIN_WEIGHTS)
            pool.append(encode_chat(tokenizer, turns, system))
        pool.sort(key=lambda x: len(x[0]))
        chunks = [pool[i:i + batch_size] for i in range(0, len(pool), batch_size)]
        rng.shuffle(chunks)
        for chunk in chunks:
            yield collate(chunk, pad_id)


def collate(items, pad_id: int):
    """Right-padded ids and labels (-100 on prompts and padding: only the replies are learned)."""
    T = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), T), pad_id, dtype=torch.long)
    labels = torch.full((len(items), T), -100, dtype=torch.long)
    for i, (ids, learn) in enumerate(items):
        row = torch.tensor(ids)
        input_ids[i, :len(ids)] = row
        labels[i, :len(ids)] = torch.where(torch.tensor(learn), row, -100)
    return input_ids, labels


# ----------------------------------------------------------------------------------------- training
class RouterBalancer:
    """Auxiliary-loss-free load balancing (DeepSeek-V3): after each step nudge every router's correction
    bias up for under-loaded experts and down for over-loaded ones. The bias only steers the selection."""

    def __init__(self, model, gamma: float) -> None:
        from transformers.models.mimo_v2_flash.modeling_mimo_v2_flash import MiMoV2FlashTopkRouter

        self.gamma, self.counts = gamma, {}
        self.routers = [m for m in model.modules() if isinstance(m, MiMoV2FlashTopkRouter)]
        for r in self.routers:
            r.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if module.training:
            idx = output[2].reshape(-1)
            self.counts[module] = torch.bincount(idx, minlength=module.num_experts).float()

    @torch.no_grad()
    def step(self) -> float:
        worst = 0.0
        for r, c in self.counts.items():
            r.e_score_correction_bias += self.gamma * torch.sign(c.mean() - c)
            worst = max(worst, (c.max() / c.mean().clamp(min=1)).item())
        self.counts.clear()
        return worst


class RoutingPredictability:
    """Auxiliary loss that makes each MoE layer's routing predictable one layer early (as Pre-gated MoE,
    arXiv 2308.12066, but with the architecture unchanged): the runtime prefetches layer j's experts by
    applying layer j's norm and router to the residual stream right after layer j-1's attention; this loss
    pulls that early guess towards layer j's real choice. The real choice and the router weights are
    detached, so only the hidden states learn to carry the information; ranking is compared with a
    temperature softmax over the selection scores (sigmoid + correction bias)."""

    def __init__(self, model, temperature: float = 0.05) -> None:
        self.temperature, self.mid = temperature, {}
        self.layers = list(model.model.layers)
        for i, layer in enumerate(self.layers):
            layer.post_attention_layernorm.register_forward_hook(self._hook(i))

    def _hook(self, i: int):
        def hook(module, args, output):
            self.mid[i] = (args[0], output)  # residual after attention, router input
        return hook

    def _choice(self, router, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        scores = F.linear(x.reshape(-1, x.shape[-1]).float(), weight.float()).sigmoid()
        return (scores + router.e_score_correction_bias) / self.temperature

    def loss(self) -> torch.Tensor:
        losses = []
        for j in range(1, len(self.layers)):
            router = getattr(self.layers[j].mlp, "gate", None)
            if router is None or j - 1 not in self.mid or j not in self.mid:
                continue
            norm = self.layers[j].post_attention_layernorm
            early = F.rms_norm(self.mid[j - 1][0], norm.weight.shape, norm.weight.detach(), norm.variance_epsilon)
            target = self._choice(router, self.mid[j][1].detach(), router.weight.detach()).softmax(-1)
            guess = self._choice(router, early, router.weight.detach()).log_softmax(-1)
            losses.append(F.kl_div(guess, target, reduction="batchmean"))
        self.mid.clear()
        return torch.stack(losses).mean()


def lr_at(progress: float, lr: float, warmup: float = 0.03) -> float:
    if progress < warmup:
        return lr * progress / warmup
    p = min(1.0, (progress - warmup) / (1 - warmup))
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


@torch.no_grad()
def teacher_forced_eval(model, mtp, tokenizer, items, pad_id: int) -> dict:
    """Exact match under teacher forcing (every reply token is the argmax <=> greedy decoding reproduces the
    reply) and the MTP draft accuracy on reply tokens, on (system, turns) conversations (a chat counts as
    exact when every one of its replies is)."""
    model.eval(), mtp.eval()
    ok = total = drafts_ok = drafts = 0
    for i in range(0, len(items), 100):
        chunk = [encode_chat(tokenizer, turns, system) for system, turns in items[i:i + 100]]
        input_ids, labels = collate(chunk, pad_id)
        hidden = model.model(input_ids=input_ids).last_hidden_state
        pred = model.lm_head(hidden).argmax(-1)
        tgt, m = labels[:, 1:], labels[:, 1:] != -100
        ok += ((pred[:, :-1] == tgt) | ~m).all(1).sum().item()
        total += len(chunk)
        dpred = mtp_logits(model, mtp, input_ids, hidden).argmax(-1)[:, :-1]
        dt, dm = labels[:, 2:], labels[:, 2:] != -100
        drafts_ok += ((dpred == dt) & dm).sum().item()
        drafts += dm.sum().item()
    model.train(), mtp.train()
    return {"exact": ok / total, "mtp": drafts_ok / max(drafts, 1)}


def initial(args) -> tuple:
    """(model, MTP layer, tokenizer) to train: fresh (a tokenizer built from --seed and a random init), or
    --init's checkpoint and tokenizer (a fine-tune that keeps the token ids the weights were trained on)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer, MiMoV2FlashForCausalLM

    if args.init:
        tokenizer = AutoTokenizer.from_pretrained(args.init)
        for key in ("is_local", "local_files_only"):  # how it was loaded, which save_pretrained would write
            tokenizer.init_kwargs.pop(key, None)
        config = AutoConfig.from_pretrained(args.init)
    else:
        tokenizer = build_tokenizer(args.seed)
        vocab = 64 * math.ceil(len(tokenizer) / 64)
        ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in SPECIALS.items()}
        config = model_config(vocab, ids["bos"], ids["eos"], ids["pad"], args.size)
    config._attn_implementation = "eager"
    config._experts_implementation = "grouped_mm"  # ~1.4x faster training steps than the per-expert loop
    mtp = MTPLayer(config)
    if args.init:
        model = MiMoV2FlashForCausalLM.from_pretrained(args.init, config=config, dtype=torch.float32)
        mtp.load_checkpoint_state(load_file(Path(args.init) / "model.safetensors"))
    else:
        model = MiMoV2FlashForCausalLM(config)
    return model.float().train(), mtp.float().train(), tokenizer


def train(args) -> tuple:
    torch.manual_seed(args.seed)
    model, mtp, tokenizer = initial(args)
    vocab = model.config.vocab_size
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in SPECIALS.items()}
    n_params = sum(p.numel() for p in model.parameters()) + sum(p.numel() for p in mtp.parameters())
    print(f"tokenizer: {len(tokenizer)} ids (model vocab {vocab}); params {n_params / 1e6:.2f} M "
          f"(main {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M)", flush=True)

    params = list(model.parameters()) + list(mtp.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    balancer = RouterBalancer(model, args.bias_gamma)
    predictability = RoutingPredictability(model) if args.predict_weight else None
    # monitoring only (a seed of its own); the held-out sets are reported at the end
    val_rng = random.Random(tasks.HELDOUT_SEED + 1)
    val = [tasks.make_conversation(val_rng, heldout_only=True) for _ in range(300)]
    budget = args.minutes * 60.0
    start = time.time()
    step, tokens, log = 0, 0, {"loss": 0.0, "mtp": 0.0, "predict": 0.0, "n": 0}
    data = batches(tokenizer, args.seed, args.batch_size, ids["pad"])
    while True:
        progress = (time.time() - start) / budget
        if args.steps:
            progress = max(progress, step / args.steps)
        if progress >= 1.0:
            break
        lr = lr_at(progress, args.lr)
        for g in opt.param_groups:
            g["lr"] = lr
        input_ids, labels = next(data)
        hidden = model.model(input_ids=input_ids).last_hidden_state
        logits = model.lm_head(hidden)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=-100)
        mlogits = mtp_logits(model, mtp, input_ids, hidden)
        mloss = F.cross_entropy(mlogits[:, :-1].reshape(-1, vocab), labels[:, 2:].reshape(-1), ignore_index=-100)
        ploss = predictability.loss() if predictability else torch.zeros(())
        (loss + args.mtp_weight * mloss + args.predict_weight * ploss).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        imbalance = balancer.step()
        step += 1
        tokens += input_ids.numel()
        log["loss"] += loss.item(); log["mtp"] += mloss.item(); log["predict"] += ploss.item(); log["n"] += 1
        if step % args.log_every == 0:
            elapsed = time.time() - start
            msg = (f"step {step:5d}  {elapsed / 60:5.1f} min  lr {lr:.2e}  loss {log['loss'] / log['n']:.4f}  "
                   f"mtp {log['mtp'] / log['n']:.4f}  predict {log['predict'] / log['n']:.4f}  "
                   f"max/mean expert load {imbalance:.2f}  "
                   f"{tokens / elapsed:.0f} tok/s")
            if step % (args.log_every * args.eval_every) == 0:
                r = teacher_forced_eval(model, mtp, tokenizer, val, ids["pad"])
                msg += f"  | val exact {r['exact']:.3f}  mtp-draft {r['mtp']:.3f}"
            print(msg, flush=True)
            log = {"loss": 0.0, "mtp": 0.0, "predict": 0.0, "n": 0}
    train_s = time.time() - start
    print(f"trained {step} steps, {tokens} tokens in {train_s / 60:.1f} min", flush=True)
    return model.eval(), mtp.eval(), tokenizer, {"steps": step, "train_minutes": round(train_s / 60, 1)}


# ----------------------------------------------------------------------------------------- saving
CHECKPOINT_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                    "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def save(model, mtp, tokenizer, out: Path) -> None:
    """save_pretrained into a temporary directory, add the MTP tensors, then rename the files into `out`."""
    from safetensors.torch import load_file, save_file
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-tmp-", dir=out.parent))
    try:
        model.generation_config = GenerationConfig(
            bos_token_id=model.config.bos_token_id, eos_token_id=model.config.eos_token_id,
            pad_token_id=model.config.pad_token_id, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        weights = tmp / "model.safetensors"
        tensors = load_file(weights)
        tensors.update({k: v.contiguous() for k, v in mtp.checkpoint_state().items()})
        save_file(tensors, weights, metadata={"format": "pt"})
        for name in os.listdir(tmp):
            os.chmod(tmp / name, 0o644)
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def generate_replies(model, tokenizer, chats: list[list[dict]], batch_size: int = 64) -> list[str]:
    """Greedy replies to chats (message lists) with transformers' generate (left-padded batches)."""
    replies = []
    for i in range(0, len(chats), batch_size):
        prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                   for c in chats[i:i + batch_size]]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**enc, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
        replies += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return replies


@torch.no_grad()
def mtp_acceptance(model, mtp, tokenizer, questions: list[str], replies: list[str]) -> float:
    """First-draft acceptance of the MTP layer under greedy speculative decoding: over the generated reply
    tokens t+2 (the model's own greedy continuation, with its end token), the fraction the MTP layer drafts
    right from (h_t, token t+1)."""
    hits = total = 0
    for q, r in zip(questions, replies):
        ids, learn = encode_chat(tokenizer, [("", q, r)])
        x = torch.tensor([ids])
        hidden = model.model(input_ids=x).last_hidden_state
        draft = mtp_logits(model, mtp, x, hidden).argmax(-1)[0]  # draft[t] predicts ids[t + 2]
        for t in range(len(ids) - 2):
            if learn[t + 2]:
                hits += int(draft[t].item() == ids[t + 2])
                total += 1
    return hits / max(total, 1)


def evaluate(out: Path, n: int = 500) -> dict:
    """Reload the saved checkpoint with transformers and measure it (offload.demo.evaluation: first turns,
    later turns, unseen phrasings) and its MTP layer's acceptance."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, MiMoV2FlashForCausalLM

    from offload.demo import evaluation

    model = MiMoV2FlashForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    scores = evaluation.measure(lambda chats: generate_replies(model, tokenizer, chats), n)
    questions = [q for _, q, _ in tasks.heldout(min(200, n))]
    replies = generate_replies(model, tokenizer, [[{"role": "user", "content": q}] for q in questions])
    mtp = MTPLayer(model.config)
    mtp.load_checkpoint_state(load_file(out / "model.safetensors"))
    return {split: {"exact_match": round(r["exact_match"], 4), "n": r["n"],
                    "per_kind": {k: round(v, 3) for k, v in r["per_kind"].items()}} for split, r in scores.items()} | {
        "mtp_acceptance": round(mtp_acceptance(model, mtp.eval(), tokenizer, questions, replies), 4),
        "examples": [(q, r) for q, r in zip(questions[:8], replies[:8])]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=42.0, help="training wall-clock budget (default 42)")
    p.add_argument("--out", type=Path, default=ROOT / "offload" / "demo", help="checkpoint directory")
    p.add_argument("--init", type=Path, default=None,
                   help="start from this checkpoint (weights, MTP layer and tokenizer) instead of a random init")
    p.add_argument("--seed", type=int, default=0, help="seed of the tokenizer corpus, init and data stream")
    p.add_argument("--steps", type=int, default=0, help="also stop (and finish the schedule) after this many steps")
    p.add_argument("--threads", type=int, default=2,
                   help="torch CPU threads (default 2; on a 2-core machine shared with other jobs use 1)")
    p.add_argument("--size", choices=sorted(SIZES), default="small", help="model size (see SIZES)")
    p.add_argument("--batch-size", type=int, default=16, help="chats per step (1-4 turns each, ~2 on average)")
    p.add_argument("--lr", type=float, default=2e-3,
                   help="peak learning rate (2e-3; at 5e-3 the loss stalls while the rate is high: docs/demo_model.md)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--mtp-weight", type=float, default=0.3, help="weight of the MTP loss (DeepSeek-V3 uses 0.1-0.3)")
    p.add_argument("--predict-weight", type=float, default=0.1,
                   help="weight of the routing-predictability loss (RoutingPredictability; 0 turns it off: "
                        "docs/demo_model.md)")
    p.add_argument("--bias-gamma", type=float, default=1e-2, help="router correction-bias update speed")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=5, help="teacher-forced validation every N log lines")
    p.add_argument("--eval-n", type=int, default=500,
                   help="held-out first turns and unseen phrasings measured at the end (and n/2 conversations)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, mtp, tokenizer, info = train(args)
    save(model, mtp, tokenizer, args.out)
    size = sum((args.out / f).stat().st_size for f in CHECKPOINT_FILES if (args.out / f).exists())
    result = evaluate(args.out, args.eval_n)
    result.update(info, checkpoint_mb=round(size / 2**20, 2), total_minutes=round((time.time() - t0) / 60, 1),
                  command=" ".join(["scripts/train_demo.py", *(argv if argv is not None else sys.argv[1:])]))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
