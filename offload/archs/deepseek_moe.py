"""The MoE layout DeepSeek-V2/V3 and GLM-4.5 share: the first `first_k_dense_replace` layers dense, then MoE
layers whose routed experts sit beside shared experts (one dense MLP of n_shared_experts x moe_intermediate_size,
always resident: every token uses it) named `mlp.shared_experts.*`."""
from ..spec import AttentionSpec, ExpertSpec, LayerSpec, RouterSpec
from .base import COMMON_LAYER_RENAMES, expert_count, flag, integer, layer_count, number

# The MTP layer's copies of the embedding and LM head (its "shared" head): the main model's are used
MTP_COPIES = r"model\.layers\.\d+\.(embed_tokens|shared_head\.head)\.weight"
RENAMES = [(r"mlp\.shared_experts\.(gate|up|down)_proj\.weight", r"shared.\1"), *COMMON_LAYER_RENAMES]


def moe_model(config: dict, attention: AttentionSpec, first_dense: int, shared: int) -> dict:
    """ModelSpec's layers (the MoE ones with their shared experts) and expert (`first_dense`, `shared`: the class
    defaults of first_k_dense_replace and n_shared_experts); the router is the architecture's."""
    n = layer_count(config)
    first = integer(config, "first_k_dense_replace", default=first_dense, low=0)
    if first >= n:
        return dict(layers=tuple(LayerSpec(attention, "dense", integer(config, "intermediate_size"))
                                 for _ in range(n)), expert=None)
    experts = integer(config, "moe_intermediate_size")
    shared_size = experts * integer(config, "n_shared_experts", default=shared)
    layers = tuple(LayerSpec(attention, "dense", integer(config, "intermediate_size")) if i < first
                   else LayerSpec(attention, "moe", shared_expert_size=shared_size) for i in range(n))
    return dict(layers=layers, expert=ExpertSpec(experts))


def grouped_router(config: dict, scoring: str, renormalize: bool, defaults: dict, **fields) -> RouterSpec:
    """The routed experts' router: num_experts_per_tok of n_routed_experts, n_group / topk_group, scaled;
    `defaults`: the config class's n_group, topk_group and routed_scaling_factor."""
    return RouterSpec(expert_count(config, "n_routed_experts", "num_local_experts"),
                      integer(config, "num_experts_per_tok", low=0), scoring, renormalize,
                      scaling_factor=number(config, "routed_scaling_factor", default=defaults["routed_scaling_factor"]),
                      n_group=integer(config, "n_group", default=defaults["n_group"]),
                      topk_group=integer(config, "topk_group", default=defaults["topk_group"]), **fields)


def sigmoid_router(config: dict, defaults: dict) -> RouterSpec:
    """DeepSeek-V3 / GLM-4.5: sigmoid scores, a correction bias for the selection, groups by their best two."""
    return grouped_router(config, "sigmoid", flag(config, "norm_topk_prob", True), defaults, correction_bias=True)
