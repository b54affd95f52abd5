"""Where the engine finds adapters: a small protocol the registry implements, and a local one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from flora.model.adapter_files import CONFIG_FILE, WEIGHTS_FILE


class UnknownAdapterError(LookupError):
    """No adapter of that name is visible to the caller (never a silent fall-back to base)."""


@dataclass(frozen=True)
class AdapterRef:
    """A resolved adapter: a name and the exact version that will serve the request."""

    name: str
    version: str

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"


@runtime_checkable
class AdapterSource(Protocol):
    """Resolves names to versions and puts an adapter's two files in a local directory."""

    def resolve(self, name: str, tenant: str) -> AdapterRef:
        """The version to serve; raises :class:`UnknownAdapterError` if ``tenant`` can't see it."""
        ...

    def fetch(self, ref: AdapterRef, cache_dir: Path) -> Path:
        """A local directory holding ``adapter_config.json`` and ``adapter_model.safetensors``.

        Remote sources download under ``cache_dir``; local ones may return their own path.
        """
        ...


class LocalAdapterSource:
    """Adapters in local directories: given by name, or every subdirectory of ``root``.

    The version is derived from the weights file's size and modification time, so replacing an
    adapter's files on disk makes the next request load the new weights.
    """

    def __init__(
        self, adapters: dict[str, str | Path] | None = None, root: str | Path | None = None
    ):
        self.adapters = {name: Path(p) for name, p in (adapters or {}).items()}
        self.root = Path(root) if root is not None else None

    def _path(self, name: str) -> Path | None:
        if name in self.adapters:
            return self.adapters[name]
        if self.root is not None and "/" not in name and name not in (".", ".."):
            candidate = self.root / name
            if (candidate / CONFIG_FILE).is_file():
                return candidate
        return None

    def names(self) -> list[str]:
        found = set(self.adapters)
        if self.root is not None and self.root.is_dir():
            found |= {p.parent.name for p in self.root.glob(f"*/{CONFIG_FILE}")}
        return sorted(found)

    def resolve(self, name: str, tenant: str = "default") -> AdapterRef:
        path = self._path(name)
        weights = path / WEIGHTS_FILE if path else None
        if weights is None or not weights.is_file():
            raise UnknownAdapterError(
                f"unknown adapter {name!r}; known adapters: {self.names()[:20] or 'none'}"
            )
        stat = weights.stat()
        return AdapterRef(name, f"{stat.st_size:x}{stat.st_mtime_ns:x}"[-12:])

    def fetch(self, ref: AdapterRef, cache_dir: Path) -> Path:
        path = self._path(ref.name)
        if path is None:
            raise UnknownAdapterError(f"adapter {ref.name!r} is gone")
        return path
