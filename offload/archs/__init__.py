"""One small adapter per architecture: config.json -> ModelSpec, checkpoint names -> canonical names."""
from types import ModuleType

from ..errors import ModelFormatError
from . import gpt_oss, mimo_v2_flash, mixtral, olmoe, qwen3_moe

ADAPTERS: dict[str, ModuleType] = {m.model_type: m for m in (mixtral, qwen3_moe, olmoe, gpt_oss, mimo_v2_flash)}


def adapter_for(config: dict) -> ModuleType:
    model_type = config.get("model_type")
    if model_type not in ADAPTERS:
        raise ModelFormatError(
            f"config.json has model_type {model_type!r}, which moe-offload does not support; "
            f"supported: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type]
