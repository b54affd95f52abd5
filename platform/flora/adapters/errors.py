"""Typed errors for adapter math: callers catch these instead of parsing messages."""


class AdapterError(ValueError):
    """Base class for every adapter problem the math layer can detect."""


class InvalidAdapterError(AdapterError):
    """Adapter weights that cannot be used: wrong shape, rank, dtype or non-finite values."""


class SlotError(AdapterError):
    """A bank slot index out of range, or a batch that points at an empty slot."""
