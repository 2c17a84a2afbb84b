"""Qwen3.5-MoE beyond the generic reference tests (which cover it through hf_tiny.ARCHS): prompts longer than
the chunked delta rule's chunk, the linear-attention state's constant size and its roll-back, the multimodal
checkpoint layout and fused expert tensors (MTP speculative decoding over the recurrent state: test_speculative.py)."""
import json

import pytest
import torch
from hf_tiny import ARCHS, perturb, save_tiny
from safetensors.torch import load_file, save_file

import offload
from offload.model.kv_cache import LinearState
from offload.model.linear_attention import CHUNK

ARCH = "qwen3_5_moe"
LONG = 2 * CHUNK + 23  # crosses two chunk boundaries; far longer than the conv kernel


def _ids(n: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp(ARCH)
    return path, save_tiny(ARCH, path)


def _step_by_step(model, ids: torch.Tensor, prefill: int, slack: int = 0, rollback: int = 0) -> torch.Tensor:
    """Logits of `ids` fed as a prefill and then one token at a time; with `rollback`, each step first runs
    `rollback` extra wrong tokens along with the right one and takes them back (a rejected speculative draft)."""
    decoder, (B, T) = model.decoder, ids.shape
    cache = decoder.new_cache(B, T + slack, slack=slack)
    valid = torch.ones(B, T + slack, dtype=torch.bool)
    positions = torch.arange(T + slack).expand(B, -1)

    def run(start: int, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        return decoder.logits(decoder.hidden_states(tokens, cache, positions[:, start:start + n],
                                                    valid[:, start:start + n]))

    steps = [run(0, ids[:, :prefill])]
    for t in range(prefill, T):
        wrong = (ids[:, t:t + 1] + torch.arange(1, rollback + 1)) % 255 + 1
        steps.append(run(t, torch.cat((ids[:, t:t + 1], wrong), 1))[:, :1])
        cache.truncate(t + 1)
    return torch.cat(steps, dim=1)


def test_long_prompt_matches_transformers(tiny):
    path, ref = tiny
    ids = _ids(LONG)
    expected = ref(ids).logits
    got = offload.load(path).forward(ids)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


@pytest.mark.parametrize("prefill", [3, CHUNK + 5])
def test_recurrent_decode_equals_chunked_prefill(tiny, prefill):
    path, _ = tiny
    model = offload.load(path)
    ids = _ids(LONG)
    full = model.forward(ids)
    inc = _step_by_step(model, ids, prefill)
    assert (inc - full).abs().max() <= 1e-4 * full.abs().max()


def test_rejected_tokens_leave_no_trace_in_the_state(tiny):
    """Every decode step also runs 3 wrong tokens and rolls them back: the logits are the plain ones."""
    path, _ = tiny
    model = offload.load(path)
    ids = _ids(40)
    plain = _step_by_step(model, ids, 8)
    rolled = _step_by_step(model, ids, 8, slack=4, rollback=3)
    assert (rolled - plain).abs().max() <= 1e-5 * plain.abs().max()


def test_state_memory_is_constant_in_sequence_length(tiny):
    path, _ = tiny
    decoder = offload.load(path).decoder
    sizes = []
    for n in (8, LONG):
        cache = decoder.new_cache(1, LONG)
        decoder.hidden_states(_ids(n, 1), cache, torch.arange(n)[None], torch.ones(1, n, dtype=torch.bool))
        linear = [c for c in cache.layers if isinstance(c, LinearState)]
        assert len(linear) == 3
        sizes.append(sum(c.nbytes() for c in linear))
    assert sizes[0] == sizes[1]


def test_multimodal_checkpoint_loads_its_language_model(tmp_path):
    """The published layout: model_type qwen3_5_moe, text_config nested, model.language_model.* and
    model.visual.* (ignored)."""
    from transformers import AutoConfig, Qwen3_5MoeForConditionalGeneration
    from hf_tiny import COMMON

    text = COMMON | ARCHS[ARCH] | {"model_type": "qwen3_5_moe_text"}
    config = AutoConfig.for_model(ARCH, text_config=text, vision_config=dict(
        depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64))
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = Qwen3_5MoeForConditionalGeneration(config).eval()
    perturb(ref)
    ref.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == ARCH
    names = load_file(tmp_path / "model.safetensors").keys()
    assert any(n.startswith("model.visual.") for n in names) and any(n.startswith("model.language_model.") for n in names)
    ids = _ids(30)
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
    got = offload.load(tmp_path).forward(ids)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_fused_expert_tensors_load_as_per_expert_ones(tiny, tmp_path):
    """Checkpoints that store each layer's experts as [E, 2I, H] gate_up_proj and [E, H, I] down_proj."""
    path, _ = tiny
    state = load_file(path / "model.safetensors")
    fused = {k: v for k, v in state.items() if ".mlp.experts." not in k}
    experts = ARCHS[ARCH]["num_experts"]
    for layer in range(ARCHS[ARCH]["num_hidden_layers"]):
        p = f"model.layers.{layer}.mlp.experts."
        fused[p + "gate_up_proj"] = torch.stack([torch.cat((state[f"{p}{e}.gate_proj.weight"],
                                                            state[f"{p}{e}.up_proj.weight"])) for e in range(experts)])
        fused[p + "down_proj"] = torch.stack([state[f"{p}{e}.down_proj.weight"] for e in range(experts)])
    save_file(fused, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    ids = _ids(20)
    assert torch.equal(offload.load(tmp_path).forward(ids), offload.load(path).forward(ids))


def test_deltanet_bench_compares_the_same_rule():
    """`offload-bench deltanet` times ours and transformers' delta rules on the same inputs: their outputs agree
    (both forms, a prompt past the chunk size)."""
    from offload.bench.linear_attention import run

    results = run(prompt=CHUNK + 6, heads=2, dk=16, dv=24, runs=1, threads=1)
    for case in ("prefill", "decode"):
        assert results[case]["max_abs_diff"] <= 1e-5 and results[case]["ours"] > 0
