"""Multi-token prediction (the MTP layer of MiMo-V2-Flash, DeepSeek-V3, GLM-4.5 and Qwen3.5-MoE) for drafting
speculative tokens.

At position t the layer reads the main model's final (normed) hidden state h_t and token t+1:
    x = eh_proj(cat[enorm(embed(tok_{t+1})), hnorm(h_t)])
    x = x + attention(input_norm(x))          one decoder layer's attention (MiMo: a sliding one with sinks;
                                              Qwen3.5: gated full attention; DeepSeek-V3: MLA), its own cache
    x = x + mlp(post_attn_norm(x))            MiMo: dense SwiGLU; DeepSeek-V3 / GLM / Qwen3.5: a MoE layer with
                                              its shared expert (Qwen3.5's gated)
    logits_{t+2} = lm_head(final_norm(x))     embedding and LM head shared with the main model
Chained drafts feed the layer's own output state back as h. A MoE layer's experts stay resident (they are only
read while drafting).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..archs.base import Renamer
from ..archs.deepseek_moe import RENAMES as MOE_RENAMES
from ..archs.mla import RENAMES as MLA_RENAMES
from ..engine.resident import ResidentExperts
from ..spec import AttentionSpec, ExpertSpec, LayerSpec, ModelSpec
from .attention import Step, attention, fuse_qkv
from .decoder import group
from .kv_cache import LayerCache
from .linear import linear
from .moe import expert_mlp, moe, route, shared_expert
from .norm import rms_norm
from .rope import RotaryTable
from .threads import threads_for, with_threads

OWN = {"enorm.weight": "enorm", "hnorm.weight": "hnorm", "eh_proj.weight": "eh_proj",
       "final_layernorm.weight": "final_norm", "shared_head.norm.weight": "final_norm"}
_rename = Renamer([(r"self_attn\.attention_sink_bias", "attn.sinks"), *MLA_RENAMES, *MOE_RENAMES])


def mtp_weights(mtp: dict[str, torch.Tensor], layer: int = 0) -> dict[str, torch.Tensor] | None:
    """Canonical names for MTP layer `layer` from `model.mtp.*` tensors (prefix stripped), or None. An adapter
    may have converted them at load already (qwen3_5_moe: eh_proj and `layers.N.` + canonical layer names)."""
    prefix = f"layers.{layer}."
    if "eh_proj" in mtp:
        return {k.removeprefix(prefix): v for k, v in mtp.items() if k in OWN.values() or k.startswith(prefix)}
    out = {}
    for name, tensor in mtp.items():
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix):]
        canonical = OWN.get(rest) or _rename(f"model.layers.0.{rest}")
        if canonical is not None:
            out[canonical.removeprefix("layers.0.")] = tensor
    return out or None


def _layer_like(spec: ModelSpec) -> LayerSpec:
    """The main-model layer the MTP layer is built like: MiMo's are sliding-window; DeepSeek's, GLM's and
    Qwen3.5's like the last (a MoE layer; Qwen3.5's last is a full-attention one)."""
    layers = [layer for layer in spec.layers if isinstance(layer.attention, AttentionSpec)]
    return next((layer for layer in layers if layer.attention.window), layers[-1])


class MTPHead:
    def __init__(self, weights: dict[str, torch.Tensor], spec: ModelSpec, embed: torch.Tensor,
                 lm_head: torch.Tensor, device: torch.device, dtype: torch.dtype) -> None:
        self.spec, self.embed, self.lm_head = spec, embed, lm_head
        self.layer = _layer_like(spec)
        self.attn_spec = self.layer.attention
        self.attn = fuse_qkv(group(weights, "attn."), self.attn_spec)
        self.w = {k: v for k, v in weights.items() if not k.startswith("attn.")} | {f"attn.{k}": v
                                                                                   for k, v in self.attn.items()}
        self.mlp = group(weights, "mlp.")
        if self.mlp:  # dense
            self.mlp_spec = ExpertSpec(weights["mlp.gate"].shape[0])
        else:  # MoE like the main model's, its experts resident
            self.router = group(weights, "router.")
            self.shared = {"shared": group(weights, "shared."), "shared_gate": weights.get("shared_gate")}
            self.experts = ResidentExperts({(0, e): group(weights, f"experts.{e}.")
                                            for e in range(spec.router.num_experts)})
        self.rotary = RotaryTable(self.attn_spec.rope, device)
        self.threads = threads_for([*self.w.values(), embed, lm_head], device)
        self.device, self.dtype = device, dtype

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        if self.mlp:
            return expert_mlp(x, self.mlp, self.mlp_spec)
        spec = self.spec
        weights, ids = route(x.reshape(-1, x.shape[-1]), self.router, spec.router)
        out = moe(x, 0, weights, ids, spec.router, spec.expert, self.experts, [], 0)
        return out + shared_expert(x, self.shared, self.layer) if self.layer.shared_expert_size else out

    def new_cache(self, max_len: int, slack: int) -> LayerCache:
        return LayerCache(self.attn_spec, 1, max_len, self.dtype, self.device, slack)

    @with_threads
    def step(self, hidden: torch.Tensor, next_ids: torch.Tensor, cache: LayerCache,
             start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [1, T, H] at positions start..start+T-1, next_ids [1, T] -> (state [1, T, H], logits)."""
        eps = self.spec.rms_norm_eps
        T = hidden.shape[1]
        e = rms_norm(F.embedding(next_ids, self.embed), self.w["enorm"], eps)
        x = linear(torch.cat((e, rms_norm(hidden, self.w["hnorm"], eps)), dim=-1), self.w["eh_proj"])
        q_index = torch.arange(start, start + T, device=self.device)
        step = Step(start, q_index, torch.ones(1, T, dtype=torch.bool, device=self.device),
                    {self.attn_spec.rope: self.rotary.cos_sin(q_index[None], self.dtype)})
        x = x + attention(rms_norm(x, self.w["input_norm"], eps), self.attn, self.attn_spec, eps, step, cache)
        x = x + self._mlp(rms_norm(x, self.w["post_attn_norm"], eps))
        state = rms_norm(x, self.w["final_norm"], eps)
        return state, linear(state, self.lm_head)
