"""MTP speculative decoding on tiny random MiMo-V2-Flash, DeepSeek-V3, GLM-4.5 and Qwen3.5-MoE checkpoints with an MTP layer in
their published layouts: greedy output is token-for-token the plain greedy output (resident and offloaded);
sampling keeps the distribution."""
import pytest
import torch
from hf_tiny import save_tiny
from safetensors.torch import load_file, save_file

import offload


def _mtp_tensors(state: dict, g: torch.Generator) -> dict:
    """An MTP layer in the real checkpoints' layout: norms, eh_proj, one sliding attention layer, an MLP."""
    layer = "model.layers.1."  # a sliding layer: same attention shapes, sinks included
    out = {}
    for name, t in state.items():
        if name.startswith(layer + "self_attn.") or name.startswith(layer + "input_layernorm") or \
                name.startswith(layer + "post_attention_layernorm"):
            out["model.mtp.layers.0." + name[len(layer):]] = t + 0.05 * torch.randn(t.shape, generator=g)
    dense = "model.layers.0.mlp."
    for name in ("gate_proj.weight", "up_proj.weight", "down_proj.weight"):
        t = state[dense + name]
        out["model.mtp.layers.0.mlp." + name] = t + 0.05 * torch.randn(t.shape, generator=g)
    h = state["model.norm.weight"].numel()
    for name in ("enorm", "hnorm", "final_layernorm"):
        out[f"model.mtp.layers.0.{name}.weight"] = 1 + 0.3 * torch.randn(h, generator=g)
    out["model.mtp.layers.0.eh_proj.weight"] = 0.1 * torch.randn(h, 2 * h, generator=g)
    return out


def _layer_mtp_tensors(state: dict, layers: int, g: torch.Generator) -> dict:
    """DeepSeek-V3's / GLM-4.5's layout: model.layers.{num_hidden_layers}.* holding a MoE decoder layer (the last
    one's tensors, perturbed), enorm / hnorm / eh_proj / shared_head.norm, and copies of the embedding and head."""
    last, mtp = f"model.layers.{layers - 1}.", f"model.layers.{layers}."
    out = {mtp + name[len(last):]: t + 0.05 * torch.randn(t.shape, generator=g)
           for name, t in state.items() if name.startswith(last)}
    h = state["model.norm.weight"].numel()
    for name in ("enorm", "hnorm", "shared_head.norm"):
        out[f"{mtp}{name}.weight"] = 1 + 0.3 * torch.randn(h, generator=g)
    out[mtp + "eh_proj.weight"] = 0.1 * torch.randn(h, 2 * h, generator=g)
    out[mtp + "embed_tokens.weight"] = state["model.embed_tokens.weight"].clone()
    out[mtp + "shared_head.head.weight"] = state["lm_head.weight"].clone()
    return out


def _qwen3_5_mtp_tensors(state: dict, g: torch.Generator) -> dict:
    """An MTP module in the published layout: fc over [embedding, hidden], (1 + w) norms, one gated
    full-attention layer with a MoE (router, experts, gated shared expert). Its attention and MLP outputs are
    scaled down and fc passes the embedding through: with tied embeddings it drafts "the token repeats",
    right where the main model's greedy output repeats a token and wrong elsewhere, so steps both accept
    and reject drafts."""
    layer = "model.layers.3."  # the full-attention layer
    out = {}
    for name, t in state.items():
        if name.startswith(layer):
            small = 0.02 if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
            out["mtp.layers.0." + name[len(layer):]] = small * (t + 0.05 * torch.randn(t.shape, generator=g))
    h = state["model.norm.weight"].numel()
    for name in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        out[f"mtp.{name}.weight"] = 0.1 * torch.randn(h, generator=g)
    out["mtp.fc.weight"] = torch.cat((torch.eye(h), 0.02 * torch.randn(h, h, generator=g)), 1)
    return out


@pytest.fixture(scope="module", params=["mimo_v2_flash", "deepseek_v3", "glm4_moe", "qwen3_5_moe"])
def mtp_model(request, tmp_path_factory):
    arch = request.param
    path = tmp_path_factory.mktemp(f"{arch}_mtp")
    # Qwen3.5: tied embeddings, so its greedy output falls into repeats (and leaves them), where its MTP drafts
    ref = save_tiny(arch, path, **({"tie_word_embeddings": True} if arch == "qwen3_5_moe" else {}))
    state = load_file(path / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    if arch == "mimo_v2_flash":
        extra = _mtp_tensors(state, g)
    elif arch == "qwen3_5_moe":
        extra = _qwen3_5_mtp_tensors(state, g)
    else:
        extra = _layer_mtp_tensors(state, ref.config.num_hidden_layers, g)
    save_file(state | extra, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("cache_experts", [None, 2])
@pytest.mark.parametrize("draft", [1, 3])
def test_greedy_speculative_equals_plain(mtp_model, cache_experts, draft):
    model = offload.load(mtp_model, cache_experts=cache_experts)
    for seed in range(3):
        prompt = torch.randint(1, 256, (1, 10), generator=torch.Generator().manual_seed(seed))
        plain = model.generate(prompt, max_new_tokens=40)
        fast = model.generate(prompt, max_new_tokens=40, speculative="mtp", draft_tokens=draft)
        assert fast.tolist() == plain.tolist()
    stats = model.stats()["speculative"]
    assert stats["verify_steps"] > 0 and stats["drafted"] > 0
    assert 0 <= stats["acceptance"] <= 1
    if mtp_model.name.startswith("qwen3_5_moe"):  # its MTP is built to agree at repeats: rejected drafts must be
        assert stats["drafted"] > stats["accepted"] > 0  # rolled back out of the recurrent state, accepted kept


def test_mtp_layer_reads_every_position_once_across_draft_switches(mtp_model):
    """Steps that draft and steps that do not (the first one included, so the MTP layer's prefill result goes
    unused) alternate: the MTP layer must still read every position once, in order, with the main model's
    state there and the next token. Verification would hide a slip (greedy output stays right whatever
    the drafts), so this checks what the layer reads against a full forward over the final sequence."""
    from offload.generate import Sampling
    from offload.model.mtp import MTPHead
    from offload.speculative import DraftLength, SpecStats, speculative_loop

    class Logged(MTPHead):
        def step(self, hidden, next_ids, cache, start):
            self.reads.append((start, hidden[0], next_ids[0]))
            return super().step(hidden, next_ids, cache, start)

    class LoggedChooser(DraftLength):
        def choose(self) -> int:
            self.log.append(super().choose())
            return self.log[-1]

    model = offload.load(mtp_model)
    head = model.mtp_head
    mtp = Logged(head.w, head.spec, head.embed, head.lm_head, head.device, head.dtype)
    mtp.reads = []
    chooser = LoggedChooser(1, cost={0: 1e-9, 1: 1.0}, explore_every=2)  # k <= 1: no chained drafts
    chooser.log = []
    dev = model.device
    prompt = torch.randint(1, 256, (1, 10), generator=torch.Generator().manual_seed(5)).to(dev)
    tokens = [int(t) for t in speculative_loop(model.decoder, mtp, prompt, 40, Sampling(), model.eos_token_ids, 1,
                                               SpecStats(), chooser)]
    assert tokens == model.generate(prompt, max_new_tokens=40)[0, 10:].tolist()
    assert chooser.log[0] == 0 and {0, 1} <= set(chooser.log[1:])
    seq = torch.cat((prompt, torch.tensor([tokens], device=dev)), 1)
    n = seq.shape[1]
    reference = model.decoder.hidden_states(seq, model.decoder.new_cache(1, n), torch.arange(n, device=dev)[None],
                                            torch.ones(1, n, dtype=torch.bool, device=dev))[0]
    position = 0
    for start, hidden, next_ids in mtp.reads:
        assert start == position
        end = start + len(next_ids)
        assert next_ids.tolist() == seq[0, start + 1:end + 1].tolist()
        torch.testing.assert_close(hidden, reference[start:end], rtol=1e-4, atol=1e-5)
        position = end
    assert position >= n - 4  # all but the last step's unread states


def test_sampling_acceptance_rule_preserves_distribution():
    """The acceptance rule applied to drafts from q yields exactly the target p (exact enumeration)."""
    from offload.speculative import _accept

    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])
    counts = torch.zeros(4)
    n = 20000
    for _ in range(n):
        d = int(torch.multinomial(q, 1, generator=g))
        out = _accept(d, p, q, g)
        counts[d if out is None else out] += 1
    assert torch.allclose(counts / n, p, atol=0.015)


def test_speculative_requires_mtp_weights(tmp_path):
    save_tiny("mixtral", tmp_path)
    with pytest.raises(ValueError, match="no MTP layer"):
        offload.load(tmp_path).generate(torch.tensor([[1, 2]]), max_new_tokens=3, speculative="mtp")


def test_draft_length_follows_per_position_acceptance_and_cost():
    """Fed the outcomes of a model whose first draft is always right and later ones never, the chooser
    settles on one draft; when every draft is right and verifying is nearly free, on the longest."""
    from offload.speculative import DraftLength

    def settle(first_only: bool, cost) -> int:
        chooser = DraftLength(3)
        for _ in range(200):
            k = chooser.choose()
            accepted = min(k, 1) if first_only else k
            chooser.update(k, cost(k), accepted)
        return max(range(4), key=chooser.rate)

    assert settle(True, lambda k: 1.0 + 0.3 * k) == 1
    assert settle(False, lambda k: 1.0 + 0.05 * k) == 3
    assert settle(True, lambda k: 1.0 + 1.5 * k) == 0  # a draft costing more than it brings is not taken


def test_draft_length_shrugs_off_stalls():
    """On a shared machine 5% of steps stall (30x slower). Drafting one token stays the best length
    throughout; the chooser must not let a stall timed on a rarely run length rule it out for good."""
    import random
    import statistics

    from offload.speculative import DraftLength

    shares = []
    for seed in range(20):
        rng, chooser, chosen = random.Random(seed), DraftLength(3), []
        for _ in range(600):
            k = chooser.choose()
            stall = 30.0 if rng.random() < 0.05 else 1.0
            chooser.update(k, stall * (1.0 + 0.3 * k) * rng.uniform(0.8, 1.25), min(k, 1))
            chosen.append(k)
        shares.append(chosen[50:].count(1) / len(chosen[50:]))
    assert statistics.median(shares) >= 0.75, sorted(shares)
