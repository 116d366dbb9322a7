"""The error of saving or loading a checkpoint (its own module: the DCP reader and the checkpoint
folder code both raise it, and the folder code reads DCP checkpoints)."""


class CheckpointError(RuntimeError):
    """Saving or loading a checkpoint failed; the message names the path."""
