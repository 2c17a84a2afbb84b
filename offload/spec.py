"""Plain dataclasses that describe a model: what the generic decoder needs, nothing more.

Adapters in `offload.archs` turn a config.json into a `ModelSpec`; the runtime never looks at
config.json itself, so one decoder serves every architecture.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class RopeSpec:
    theta: float
    head_dim: int
    partial_factor: float = 1.0
    kind: Literal["default", "yarn"] = "default"
    # YaRN parameters (ignored for "default")
    factor: float = 1.0
    original_max_positions: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None


@dataclass(frozen=True)
class MLASpec:
    """DeepSeek's Multi-head Latent Attention: queries through an optional low-rank bottleneck, keys and values
    from one shared latent (kv_lora_rank) plus one shared rotary key (the AttentionSpec's rope.head_dim)."""
    q_lora_rank: int | None  # None: one full q projection
    kv_lora_rank: int
    nope_dim: int  # qk_nope_head_dim: the query/key channels without position
    interleaved: bool  # rotary pairs are adjacent channels (x0, x1), not the two halves
    softmax_scale: float  # qk_head_dim ** -0.5, times YaRN's mscale(factor, mscale_all_dim) squared


@dataclass(frozen=True)
class AttentionSpec:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    rope: RopeSpec
    window: int | None = None  # sliding window: a query sees itself and the window-1 keys before it
    sinks: bool = False  # learned per-head logit that joins the softmax and is then dropped
    qk_norm: Literal["none", "head", "full"] = "none"  # Qwen3 per head; OLMoE over the whole projection
    qkv_bias: bool = False
    o_bias: bool = False
    value_scale: float = 1.0
    clip_qkv: float | None = None
    output_gate: bool = False  # Qwen3.5: output * sigmoid(gate); q's projection holds the gate's rows too
    mla: MLASpec | None = None  # head_dim: nope + rope channels; num_kv_heads = num_heads

    def cache_dims(self) -> tuple[int, int, int]:
        """(heads, key channels, value channels) one cached position holds: MLA keeps its latent and rotary key."""
        if self.mla is not None:
            return 1, self.mla.kv_lora_rank, self.rope.head_dim
        return self.num_kv_heads, self.head_dim, self.v_head_dim


@dataclass(frozen=True)
class LinearAttentionSpec:
    """Gated DeltaNet (Qwen3.5-MoE's linear attention): a causal depthwise conv over the q/k/v projection, then
    the gated delta rule over a [k_head_dim, v_head_dim] state per value head; no positions, no KV cache."""
    num_k_heads: int
    num_v_heads: int
    k_head_dim: int
    v_head_dim: int
    conv_kernel: int

    @property
    def conv_channels(self) -> int:
        return 2 * self.num_k_heads * self.k_head_dim + self.num_v_heads * self.v_head_dim


@dataclass(frozen=True)
class RouterSpec:
    num_experts: int
    top_k: int
    scoring: Literal["softmax", "softmax_topk_first", "sigmoid"]
    renormalize: bool
    scaling_factor: float = 1.0
    bias: bool = False  # gpt-oss router bias, part of the logits
    correction_bias: bool = False  # DeepSeek/MiMo: added for the selection only
    n_group: int = 1
    topk_group: int = 1
    group_score: Literal["top2_sum", "max"] = "top2_sum"  # how a group ranks: DeepSeek-V3's / V2's
    fp32_logits: bool = False  # softmax scoring from fp32 logits (DeepSeek-V2); sigmoid scoring always is


@dataclass(frozen=True)
class ExpertSpec:
    intermediate_size: int
    activation: Literal["swiglu", "swiglu_clamp"] = "swiglu"
    bias: bool = False
    alpha: float = 1.702  # swiglu_clamp only
    limit: float = 7.0  # swiglu_clamp only


@dataclass(frozen=True)
class LayerSpec:
    attention: AttentionSpec | LinearAttentionSpec
    mlp: Literal["dense", "moe"]
    dense_intermediate_size: int = 0
    shared_expert_size: int = 0  # a dense expert beside the routed ones (MoE layers; 0: none)
    shared_expert_gate: bool = False  # Qwen3.5: its output times sigmoid(a learned projection of the input)


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    vocab_size: int
    hidden_size: int
    rms_norm_eps: float
    layers: tuple[LayerSpec, ...]
    router: RouterSpec | None
    expert: ExpertSpec | None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    max_position_embeddings: int = 4096
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if layer.mlp == "moe"]

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical tensor name -> shape, for every tensor the decoder needs."""
        H = self.hidden_size
        shapes: dict[str, tuple[int, ...]] = {"embed": (self.vocab_size, H), "norm": (H,)}
        if not self.tie_word_embeddings:
            shapes["lm_head"] = (self.vocab_size, H)
        for i, layer in enumerate(self.layers):
            a, p = layer.attention, f"layers.{i}."
            shapes |= {p + "input_norm": (H,), p + "post_attn_norm": (H,)}
            if isinstance(a, LinearAttentionSpec):
                local = linear_attention_shapes(a, H)
            else:
                local = mla_shapes(a, H) if a.mla is not None else attention_shapes(a, H)
            shapes |= {p + name: shape for name, shape in local.items()}
            if layer.shared_expert_size:
                n = layer.shared_expert_size
                shapes |= {p + "shared.gate": (n, H), p + "shared.up": (n, H), p + "shared.down": (H, n)}
            if layer.shared_expert_gate:
                shapes[p + "shared_gate"] = (1, H)
            if layer.mlp == "dense":
                inter = layer.dense_intermediate_size
                shapes |= {p + "mlp.gate": (inter, H), p + "mlp.up": (inter, H), p + "mlp.down": (H, inter)}
                continue
            r, e = self.router, self.expert
            shapes[p + "router.weight"] = (r.num_experts, H)
            if r.bias:
                shapes[p + "router.bias"] = (r.num_experts,)
            if r.correction_bias:
                shapes[p + "router.correction_bias"] = (r.num_experts,)
            for x in range(r.num_experts):
                q = f"{p}experts.{x}."
                shapes |= {q + "gate": (e.intermediate_size, H), q + "up": (e.intermediate_size, H),
                           q + "down": (H, e.intermediate_size)}
                if e.bias:
                    shapes |= {q + "gate_bias": (e.intermediate_size,), q + "up_bias": (e.intermediate_size,),
                               q + "down_bias": (H,)}
        return shapes


def attention_shapes(a: AttentionSpec, hidden: int) -> dict[str, tuple[int, ...]]:
    """A grouped-query attention layer's tensors (names after `layers.N.`)."""
    q_out, kv_out, v_out = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.num_kv_heads * a.v_head_dim
    # a gated q (Qwen3.5) carries its gate's rows
    shapes = {"attn.q": ((2 if a.output_gate else 1) * q_out, hidden), "attn.k": (kv_out, hidden),
              "attn.v": (v_out, hidden), "attn.o": (hidden, a.num_heads * a.v_head_dim)}
    if a.qkv_bias:
        shapes |= {"attn.q_bias": (q_out,), "attn.k_bias": (kv_out,), "attn.v_bias": (v_out,)}
    if a.o_bias:
        shapes["attn.o_bias"] = (hidden,)
    if a.qk_norm == "head":
        shapes |= {"attn.q_norm": (a.head_dim,), "attn.k_norm": (a.head_dim,)}
    elif a.qk_norm == "full":
        shapes |= {"attn.q_norm": (q_out,), "attn.k_norm": (kv_out,)}
    if a.sinks:
        shapes["attn.sinks"] = (a.num_heads,)
    return shapes


def mla_shapes(a: AttentionSpec, hidden: int) -> dict[str, tuple[int, ...]]:
    """An MLA layer's attention tensors (names after `layers.N.`); biases where attention_bias is set."""
    m, heads, rope = a.mla, a.num_heads, a.rope.head_dim
    shapes = {"attn.kv_a": (m.kv_lora_rank + rope, hidden), "attn.kv_a_norm": (m.kv_lora_rank,),
              "attn.kv_b": (heads * (m.nope_dim + a.v_head_dim), m.kv_lora_rank),
              "attn.o": (hidden, heads * a.v_head_dim)}
    if m.q_lora_rank is None:
        shapes["attn.q"] = (heads * a.head_dim, hidden)
    else:
        shapes |= {"attn.q_a": (m.q_lora_rank, hidden), "attn.q_a_norm": (m.q_lora_rank,),
                   "attn.q_b": (heads * a.head_dim, m.q_lora_rank)}
    if a.qkv_bias:
        shapes |= {"attn.kv_a_bias": (m.kv_lora_rank + rope,)} | (
            {"attn.q_a_bias": (m.q_lora_rank,)} if m.q_lora_rank is not None else {})
    if a.o_bias:
        shapes["attn.o_bias"] = (hidden,)
    return shapes


def linear_attention_shapes(a: LinearAttentionSpec, hidden: int) -> dict[str, tuple[int, ...]]:
    """A Gated DeltaNet layer's tensors (names after `layers.N.`)."""
    value = a.num_v_heads * a.v_head_dim
    return {"attn.qkv": (a.conv_channels, hidden), "attn.z": (value, hidden), "attn.b": (a.num_v_heads, hidden),
            "attn.a": (a.num_v_heads, hidden), "attn.conv": (a.conv_channels, a.conv_kernel),
            "attn.A_log": (a.num_v_heads,), "attn.dt_bias": (a.num_v_heads,), "attn.norm": (a.v_head_dim,),
            "attn.o": (hidden, value)}
