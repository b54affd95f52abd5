"""The one error the adapter format raises: the registry answers it as a 422, the engine as a
refused adapter, both with the same message."""

from __future__ import annotations


class AdapterFormatError(ValueError):
    """An adapter's files break the format or the serving limits; ``param`` names the field."""

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
