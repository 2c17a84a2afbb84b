import os

# The Triton interpreter must be chosen before any @triton.jit function is defined.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from hf_tiny import ARCHS, SHARD_SIZES, save_tiny  # noqa: E402

torch.set_num_threads(1)  # tiny models: one thread is as fast, and never oversubscribes a busy machine


@pytest.fixture(scope="session", params=sorted(ARCHS))
def tiny(request, tmp_path_factory):
    """(arch, checkpoint dir, transformers reference model) for every architecture."""
    arch = request.param
    directory = tmp_path_factory.mktemp(arch)
    return arch, directory, save_tiny(arch, directory)


@pytest.fixture(scope="session")
def tiny_sharded(tiny, tmp_path_factory):
    """`tiny` re-saved by save_pretrained in small shards (many, splitting experts across them), same model."""
    arch, _, ref = tiny
    directory = tmp_path_factory.mktemp(f"{arch}-sharded")
    ref.save_pretrained(directory, max_shard_size=SHARD_SIZES.get(arch, "100KB"))
    return arch, directory, ref

