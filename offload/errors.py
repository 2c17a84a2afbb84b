"""Exception types users can catch; every message names the problem and the fix."""


class OffloadError(Exception):
    """Base class of every error this package raises on purpose."""


class ModelFormatError(OffloadError, ValueError):
    """config.json or the model directory is missing, malformed or unsupported."""


class CheckpointError(OffloadError, ValueError):
    """A safetensors shard or index is missing, truncated or disagrees with config.json."""
