"""The error and warning types of the checkpoint layer."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded or saved as it stands; the message names the file and the tensor."""


class NonFiniteWeightWarning(UserWarning):
    """A loaded checkpoint holds NaN or infinity in some tensor(s); the message names them. The model loads (some
    checkpoints carry an unused inf on purpose), but its outputs may be NaN: filter it with `warnings` to ignore
    it, or turn it into an error with `warnings.simplefilter("error", NonFiniteWeightWarning)`."""


__all__ = ["CheckpointError", "NonFiniteWeightWarning"]
