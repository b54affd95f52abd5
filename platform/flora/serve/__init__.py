"""Serving: the bridge from the adapter registry to the engine (the Ray Serve app follows)."""

from flora.serve.registry_source import RegistryAdapterSource

__all__ = ["RegistryAdapterSource"]
