"""Adapter files in a local directory: the embedded default, and what tests and demos use."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from adapter_registry.blobs.base import BlobStore
from adapter_registry.errors import NotFound, Unavailable


class LocalBlobStore(BlobStore):
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = str(self.root)

    def _dir(self, tenant: str, name: str, version: int) -> Path:
        return self.root / tenant / name / str(version)

    def uri(self, tenant: str, name: str, version: int) -> str:
        return self._dir(tenant, name, version).as_uri()

    def _path(self, uri: str) -> Path:
        if not uri.startswith("file://"):
            raise NotFound(f"{uri!r} is not in the local adapter store")
        path = Path(uri.removeprefix("file://")).resolve()
        if not path.is_relative_to(self.root):
            raise NotFound(f"{uri!r} is outside the local adapter store {self.root}")
        return path

    def put(self, tenant: str, name: str, version: int, files: dict[str, bytes]) -> str:
        final = self._dir(tenant, name, version)
        staging = None
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".upload-", dir=final.parent))
            for filename, data in files.items():
                with open(staging / filename, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            os.rename(staging, final)  # atomic: readers see all files or none
        except OSError as e:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            raise Unavailable(f"cannot write to the adapter store {self.root}: {e}") from e
        return final.as_uri()

    def get(self, uri: str, dest: Path, names: list[str]) -> None:
        source = self._path(uri)
        for filename in names:
            try:
                shutil.copyfile(source / filename, dest / filename)
            except FileNotFoundError as e:
                raise NotFound(f"{filename} is missing from {uri}") from e

    def delete(self, uri: str) -> None:
        shutil.rmtree(self._path(uri), ignore_errors=True)

    def ping(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise Unavailable(f"the adapter store {self.root} is not writable")
