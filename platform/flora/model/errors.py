"""Typed errors for checkpoints and adapters that cannot be loaded."""


class CheckpointError(Exception):
    """A model checkpoint is missing, malformed, or not a GPTBigCode model."""


class AdapterFileError(Exception):
    """An adapter directory is missing, unsafe, or does not fit the model."""
