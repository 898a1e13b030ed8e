"""The one error type of the checkpoint layer."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it stands; the message names the file and the tensor."""


__all__ = ["CheckpointError"]
