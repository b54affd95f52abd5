"""Blob stores for adapter files: S3-compatible (production) and a local directory (default)."""

from adapter_registry.blobs.base import BlobStore
from adapter_registry.blobs.local import LocalBlobStore
from adapter_registry.blobs.s3 import S3BlobStore, parse_s3_uri, read_s3_files

__all__ = ["BlobStore", "LocalBlobStore", "S3BlobStore", "parse_s3_uri", "read_s3_files"]
