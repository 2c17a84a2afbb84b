"""Multi-head Latent Attention as DeepSeek-V2 and V3 configure it (model/mla.py computes it): config fields,
softmax scale, tensor names."""
import math

from ..spec import AttentionSpec, MLASpec
from .base import bad, flag, integer, rope_params, rope_spec

RENAMES = [(r"self_attn\.q_a_proj\.weight", "attn.q_a"), (r"self_attn\.q_a_proj\.bias", "attn.q_a_bias"),
           (r"self_attn\.q_a_layernorm\.weight", "attn.q_a_norm"), (r"self_attn\.q_b_proj\.weight", "attn.q_b"),
           (r"self_attn\.kv_a_proj_with_mqa\.weight", "attn.kv_a"),
           (r"self_attn\.kv_a_proj_with_mqa\.bias", "attn.kv_a_bias"),
           (r"self_attn\.kv_a_layernorm\.weight", "attn.kv_a_norm"), (r"self_attn\.kv_b_proj\.weight", "attn.kv_b")]


def _mscale(factor: float, m: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def mla_attention(config: dict, max_positions: int, interleaved: bool) -> AttentionSpec:
    """The attention of every layer; `interleaved`: rotary pairs are adjacent channels (V2 always; V3 where
    rope_interleave says so)."""
    heads = integer(config, "num_attention_heads")
    if integer(config, "num_key_value_heads", default=heads, null=heads) != heads:
        raise bad("num_key_value_heads", config["num_key_value_heads"],
                  f"num_attention_heads={heads} (MLA expands its latent to every head)")
    nope, rope_dim = integer(config, "qk_nope_head_dim"), integer(config, "qk_rope_head_dim")
    v_dim = integer(config, "v_head_dim")
    if "head_dim" in config and config["head_dim"] != rope_dim:  # transformers rotates head_dim channels
        raise bad("head_dim", config["head_dim"], f"left out or equal to qk_rope_head_dim={rope_dim}")
    params = rope_params(config, 1e4)
    rope = rope_spec(params, rope_dim, max_positions)
    scale = (nope + rope_dim) ** -0.5
    if rope.kind == "yarn" and rope.mscale_all_dim:  # transformers' yarn_apply_mscale: every score channel too
        scale *= _mscale(rope.factor, rope.mscale_all_dim) ** 2
    bias = flag(config, "attention_bias", False)
    mla = MLASpec(q_lora_rank=integer(config, "q_lora_rank", default=1536, null=None),  # the classes' default
                  kv_lora_rank=integer(config, "kv_lora_rank"), nope_dim=nope, interleaved=interleaved,
                  softmax_scale=scale)
    return AttentionSpec(num_heads=heads, num_kv_heads=heads, head_dim=nope + rope_dim, v_head_dim=v_dim, rope=rope,
                         qkv_bias=bias, o_bias=bias, mla=mla)
