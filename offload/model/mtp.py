"""Multi-token prediction (the MTP layer of DeepSeek-V3, GLM-4.5 and MiMo-V2-Flash) for drafting speculative tokens.

At position t the layer reads the main model's final (normed) hidden state h_t and token t+1:
    x = eh_proj(cat[enorm(embed(tok_{t+1})), hnorm(h_t)])
    x = x + attention(input_norm(x))          one decoder layer's attention (MiMo: a sliding one), its own cache
    x = x + mlp(post_attn_norm(x))            MiMo: dense SwiGLU; DeepSeek-V3 / GLM: a MoE layer, shared experts
    logits_{t+2} = lm_head(final_norm(x))     embedding and LM head shared with the main model
Chained drafts feed the layer's own output state back as h. A MoE layer's experts stay resident (they are only
read while drafting).
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from ..archs.base import Renamer
from ..archs.deepseek_moe import RENAMES as MOE_RENAMES
from ..archs.mla import RENAMES as MLA_RENAMES
from ..engine.resident import ResidentExperts
from ..spec import ExpertSpec, ModelSpec
from .attention import Step, attention, fuse_qkv
from .kv_cache import LayerCache
from .linear import linear
from .moe import expert_mlp, moe, route
from .norm import rms_norm
from .rope import RotaryTable
from .threads import threads_for, with_threads

OWN = {"enorm.weight": "enorm", "hnorm.weight": "hnorm", "eh_proj.weight": "eh_proj",
       "final_layernorm.weight": "final_norm", "shared_head.norm.weight": "final_norm"}
_rename = Renamer([(r"self_attn\.attention_sink_bias", "attn.sinks"), *MLA_RENAMES, *MOE_RENAMES])
EXPERT = re.compile(r"experts\.(\d+)\.(\w+)")


def mtp_weights(mtp: dict[str, torch.Tensor], layer: int = 0) -> dict[str, torch.Tensor] | None:
    """Canonical names for MTP layer `layer` from `model.mtp.*` tensors (prefix stripped), or None."""
    prefix = f"layers.{layer}."
    out = {}
    for name, tensor in mtp.items():
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix):]
        canonical = OWN.get(rest) or _rename(f"model.layers.0.{rest}")
        if canonical is not None:
            out[canonical.removeprefix("layers.0.")] = tensor
    return out or None


def _part(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


class MTPHead:
    def __init__(self, weights: dict[str, torch.Tensor], spec: ModelSpec, embed: torch.Tensor,
                 lm_head: torch.Tensor, device: torch.device, dtype: torch.dtype) -> None:
        self.spec, self.embed, self.lm_head = spec, embed, lm_head
        # MiMo's MTP layer attends like its sliding layers; DeepSeek's and GLM's like every layer
        self.attn_spec = next((layer.attention for layer in spec.layers if layer.attention.window),
                              spec.layers[-1].attention)
        self.attn = fuse_qkv(_part(weights, "attn."), self.attn_spec)
        self.w = {k: v for k, v in weights.items() if not k.startswith("attn.")} | {f"attn.{k}": v
                                                                                   for k, v in self.attn.items()}
        self.mlp = _part(weights, "mlp.")
        self.mlp_spec = ExpertSpec(weights["mlp.gate"].shape[0]) if self.mlp else None
        self.router, self.shared = _part(weights, "router."), _part(weights, "shared.")
        experts: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        for name, tensor in weights.items():
            if m := EXPERT.fullmatch(name):
                experts.setdefault((0, int(m[1])), {})[m[2]] = tensor
        self.experts = ResidentExperts(experts)
        self.rotary = RotaryTable(self.attn_spec.rope, device)
        self.threads = threads_for([*self.w.values(), embed, lm_head], device)
        self.device, self.dtype = device, dtype

    def new_cache(self, max_len: int, slack: int) -> LayerCache:
        return LayerCache(self.attn_spec, 1, max_len, self.dtype, self.device, slack)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        if self.mlp:
            return expert_mlp(x, self.mlp, self.mlp_spec)
        spec = self.spec
        weights, ids = route(x.reshape(-1, x.shape[-1]), self.router, spec.router)
        out = moe(x, 0, weights, ids, spec.router, spec.expert, self.experts, [], 0)
        if spec.shared_intermediate_size:
            out = out + expert_mlp(x, self.shared, ExpertSpec(spec.shared_intermediate_size))
        return out

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
