"""Exception types users can catch; every message names the problem and the fix."""


class OffloadError(Exception):
    """Base class of every error this package raises on purpose."""


class ModelFormatError(OffloadError, ValueError):
    """config.json or the model directory is missing, malformed or unsupported."""


class CheckpointError(OffloadError, ValueError):
    """A safetensors shard or index, or a packed expert, is missing, truncated, ambiguous or disagrees with
    config.json or the other experts."""
