"""Adapter files in any S3-compatible store (AWS S3, MinIO, Ceph, moto) through boto3.

Credentials and endpoint come from boto3's usual sources (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, profiles, instance roles); ``endpoint_url`` here
overrides. Uploads above ``multipart_bytes`` go multipart (boto3's managed transfer); transient
errors are retried by botocore's standard mode before the registry answers 503.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from urllib.parse import urlparse

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from adapter_registry.blobs.base import BlobStore
from adapter_registry.errors import AdapterTooLarge, NotFound, RegistryError, Unavailable

_MISSING = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` → ``("bucket", "some/prefix")`` (no trailing slash)."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise RegistryError(f"{uri!r} is not an s3://bucket/prefix URI", param="uri")
    return parsed.netloc, parsed.path.strip("/")


def s3_client(endpoint_url: str | None = None, *, attempts: int = 3):
    config = Config(
        retries={"max_attempts": attempts, "mode": "standard"},
        connect_timeout=3,
        read_timeout=30,
        s3={"addressing_style": "path"},  # works with MinIO, moto and AWS alike
    )
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or None,
        config=config,
    )


class S3BlobStore(BlobStore):
    def __init__(
        self,
        url: str,
        *,
        endpoint_url: str | None = None,
        multipart_bytes: int = 64 << 20,
        attempts: int = 3,
        create_bucket: bool = False,
    ):
        self.bucket, self.prefix = parse_s3_uri(url)
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.client = s3_client(endpoint_url, attempts=attempts)
        self.transfer = TransferConfig(
            multipart_threshold=multipart_bytes, multipart_chunksize=max(multipart_bytes, 5 << 20)
        )
        if create_bucket:
            self._call("create the bucket", self._create_bucket)

    def _create_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)

    def _call(self, what: str, fn, *args, missing_ok: bool = True, **kwargs):
        """Run a boto3 call; a missing object is :class:`NotFound` where ``missing_ok``, any
        other failure :class:`Unavailable` (writes never answer 404)."""
        try:
            return fn(*args, **kwargs)
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in _MISSING and missing_ok:
                raise NotFound(f"cannot {what}: not found in {self.url} ({code})") from e
            raise Unavailable(f"cannot {what} in the adapter store {self.url}: {code}") from e
        except BotoCoreError as e:  # connection refused, timeouts, DNS, ...
            raise Unavailable(f"the adapter store {self.url} is unreachable ({e})") from e

    def _key(self, tenant: str, name: str, version: int) -> str:
        return "/".join(p for p in (self.prefix, tenant, name, str(version)) if p)

    def uri(self, tenant: str, name: str, version: int) -> str:
        return f"s3://{self.bucket}/{self._key(tenant, name, version)}"

    def _own(self, uri: str) -> str:
        bucket, key = parse_s3_uri(uri)
        inside = not self.prefix or key.startswith(self.prefix + "/")
        if bucket != self.bucket or not inside:
            raise NotFound(f"{uri!r} is not in the adapter store {self.url}")
        return key

    def put(self, tenant: str, name: str, version: int, files: dict[str, bytes]) -> str:
        key = self._key(tenant, name, version)
        written: list[str] = []
        try:
            # weights first, the config last: a reader that finds the config finds the weights
            for filename in sorted(files, key=lambda f: f.endswith(".json")):
                self._call(
                    f"upload {filename}",
                    self.client.upload_fileobj,
                    io.BytesIO(files[filename]),
                    self.bucket,
                    f"{key}/{filename}",
                    Config=self.transfer,
                    missing_ok=False,
                )
                written.append(f"{key}/{filename}")
        except Unavailable:
            with contextlib.suppress(Unavailable):
                self._delete_keys(written)  # best effort; the index never pointed here
            raise
        return f"s3://{self.bucket}/{key}"

    def get(self, uri: str, dest: Path, names: list[str]) -> None:
        key = self._own(uri)
        for filename in names:
            self._call(
                f"download {filename}",
                self.client.download_file,
                self.bucket,
                f"{key}/{filename}",
                str(dest / filename),
            )

    def delete(self, uri: str) -> None:
        key = self._own(uri)
        listing = self._call(
            "list", self.client.list_objects_v2, Bucket=self.bucket, Prefix=key + "/"
        )
        self._delete_keys([o["Key"] for o in listing.get("Contents", [])])

    def _delete_keys(self, keys: list[str]) -> None:
        if keys:
            objects = [{"Key": k} for k in keys]
            self._call(
                "delete",
                self.client.delete_objects,
                Bucket=self.bucket,
                Delete={"Objects": objects},
            )

    def ping(self) -> None:
        self._call(
            "reach the bucket", self.client.head_bucket, Bucket=self.bucket, missing_ok=False
        )


def read_s3_files(
    uri: str, names: list[str], *, max_bytes: dict[str, int], endpoint_url: str | None = None
) -> dict[str, bytes]:
    """Fetch ``names`` under an arbitrary ``s3://`` prefix (imports), checking sizes first."""
    bucket, prefix = parse_s3_uri(uri)
    client = s3_client(endpoint_url)
    out: dict[str, bytes] = {}
    for filename in names:
        key = f"{prefix}/{filename}" if prefix else filename
        try:
            size = client.head_object(Bucket=bucket, Key=key)["ContentLength"]
            if size > max_bytes[filename]:
                raise AdapterTooLarge(
                    f"{uri}/{filename} is {size} bytes; the limit is {max_bytes[filename]}"
                )
            data = client.get_object(Bucket=bucket, Key=key)["Body"].read(max_bytes[filename] + 1)
            if len(data) > max_bytes[filename]:  # replaced by a bigger object since the HEAD
                raise AdapterTooLarge(f"{uri}/{filename} is over {max_bytes[filename]} bytes")
            out[filename] = data
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in _MISSING or code == "403":
                raise NotFound(f"cannot read {uri}/{filename} ({code})", param="uri") from e
            raise Unavailable(f"cannot read {uri}/{filename}: {code}") from e
        except BotoCoreError as e:
            raise Unavailable(f"cannot reach the store holding {uri} ({e})") from e
    return out
