"""One small adapter per architecture: config.json -> ModelSpec, checkpoint names -> canonical names."""
from types import ModuleType

from ..errors import ModelFormatError
from ..spec import ModelSpec
from . import deepseek_v2, deepseek_v3, glm4_moe, gpt_oss, mimo_v2_flash, mixtral, olmoe, qwen3_5_moe, qwen3_moe
from .rules import check

ADAPTERS: dict[str, ModuleType] = {m.model_type: m for m in (mixtral, qwen3_moe, olmoe, gpt_oss, mimo_v2_flash)}
ADAPTERS |= {m.model_type: m for m in (deepseek_v2, deepseek_v3, glm4_moe)}  # DeepSeek family (issue 20)
ADAPTERS["kimi_k2"] = deepseek_v3  # Kimi-K2's config.json names DeepSeek-V3's architecture (its auto_map)
ADAPTERS |= {name: qwen3_5_moe for name in (qwen3_5_moe.model_type, *qwen3_5_moe.aliases)}


def adapter_for(config: dict) -> ModuleType:
    if not isinstance(config, dict):
        raise ModelFormatError(f"config.json holds a JSON {type(config).__name__}, not an object; re-export the "
                               "model's config with transformers' save_pretrained")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in ADAPTERS:
        raise ModelFormatError(
            f"config.json has model_type {model_type!r}, which moe-offload does not support; "
            f"supported: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type]


def read_spec(config: dict) -> tuple[ModuleType, ModelSpec]:
    """(adapter, spec) of a config.json, every field and every rule between fields checked."""
    adapter = adapter_for(config)
    return adapter, check(adapter.spec(config))
