"""Any S3-compatible object store as a blob store, through boto3.

- botocore >= 1.36 sends CRC checksums and validates them on GET by default, which several
  S3-compatible servers reject: both are set to `when_required`.
- botocore's retries are off (one attempt): RetryingBlobStore is the one layer that retries.
- Keys are never overwritten: puts send `If-None-Match: *` (create only) where the server
  supports it (`create_only`); a 412 means the key exists.
- Objects above `multipart_threshold` are uploaded in parts; a failed upload is aborted, so
  no parts linger (a killed process can still leave some: see docs/storage.md: a lifecycle rule).
"""

from __future__ import annotations

import contextlib
import email.utils
import http.client
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import botocore.exceptions as bex
from botocore.config import Config as BotoConfig
from botocore.response import StreamingBody

from storage.backends.base import BlobStore
from storage.errors import (
    BlobExists,
    BlobNotFound,
    BlobTooLarge,
    ConditionalWritesUnsupported,
    PreconditionFailed,
    StorageAccessError,
    StorageError,
    TransientStorageError,
    too_large,
)

_ACCESS_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "AllAccessDisabled",
    "AuthorizationHeaderMalformed",
    "InvalidBucketName",
    "AccountProblem",
    "403",
}
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "ServiceUnavailable",
    "InternalError",
    "503",
    "500",
}
_NETWORK_ERRORS = (
    bex.EndpointConnectionError,
    bex.ConnectionClosedError,
    bex.ReadTimeoutError,
    bex.ConnectTimeoutError,
    bex.ConnectionError,
    bex.ResponseStreamingError,
)


@dataclass(frozen=True)
class S3Settings:
    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: str = "auto"  # auto | path | virtual
    profile: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    sse: str | None = None  # AES256 | aws:kms
    sse_kms_key_id: str | None = None
    create_only: bool = True
    multipart_threshold: int = 64 * 1024 * 1024
    multipart_chunk: int = 16 * 1024 * 1024
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    max_pool_connections: int = 16


class S3BlobStore(BlobStore):
    def __init__(self, s: S3Settings) -> None:
        self.s = s
        self.prefix = s.prefix.strip("/") + "/" if s.prefix.strip("/") else ""
        session = (
            boto3.session.Session(profile_name=s.profile) if s.profile else boto3.session.Session()
        )
        self.client = session.client(
            "s3",
            endpoint_url=s.endpoint_url,
            region_name=s.region,
            aws_access_key_id=s.access_key_id,
            aws_secret_access_key=s.secret_access_key,
            config=BotoConfig(
                s3={"addressing_style": s.addressing_style},
                retries={"max_attempts": 1, "mode": "standard"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                connect_timeout=s.connect_timeout,
                read_timeout=s.read_timeout,
                max_pool_connections=s.max_pool_connections,
            ),
        )

    def describe(self) -> str:
        where = self.s.endpoint_url or "AWS"
        return f"s3://{self.s.bucket}/{self.prefix} at {where}"

    def _key(self, key: str) -> str:
        return self.prefix + key

    def _extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.s.sse:
            extra["ServerSideEncryption"] = self.s.sse
        if self.s.sse_kms_key_id:
            extra["SSEKMSKeyId"] = self.s.sse_kms_key_id
        return extra

    def put(self, key: str, data: bytes | memoryview) -> None:
        data = bytes(data)  # botocore wants bytes (a memoryview is a reused buffer: copy it)
        try:
            if len(data) > self.s.multipart_threshold:
                self._put_multipart(key, data)
                return
            args = {"Bucket": self.s.bucket, "Key": self._key(key), "Body": data, **self._extra()}
            if self.s.create_only:
                args["IfNoneMatch"] = "*"
            self.client.put_object(**args)
        except Exception as e:
            raise self._translate(e, "put", key) from e

    def _put_multipart(self, key: str, data: bytes) -> None:
        upload = self.client.create_multipart_upload(
            Bucket=self.s.bucket, Key=self._key(key), **self._extra()
        )
        upload_id = upload["UploadId"]
        try:
            parts = []
            view = memoryview(data)
            for n, off in enumerate(range(0, len(data), self.s.multipart_chunk), start=1):
                r = self.client.upload_part(
                    Bucket=self.s.bucket,
                    Key=self._key(key),
                    UploadId=upload_id,
                    PartNumber=n,
                    Body=bytes(view[off : off + self.s.multipart_chunk]),
                )
                parts.append({"ETag": r["ETag"], "PartNumber": n})
            args: dict[str, Any] = {
                "Bucket": self.s.bucket,
                "Key": self._key(key),
                "UploadId": upload_id,
                "MultipartUpload": {"Parts": parts},
            }
            if self.s.create_only:
                args["IfNoneMatch"] = "*"
            self.client.complete_multipart_upload(**args)
        except BaseException:
            with contextlib.suppress(Exception):  # the original error matters more
                self.client.abort_multipart_upload(
                    Bucket=self.s.bucket, Key=self._key(key), UploadId=upload_id
                )
            raise

    def check(self) -> None:
        try:
            self.client.list_objects_v2(Bucket=self.s.bucket, Prefix=self.prefix, MaxKeys=1)
        except Exception as e:
            raise self._translate(e, "list", self.prefix) from e

    def server_time(self) -> float | None:
        """The HTTP Date of a one-key listing (whole seconds; every S3 response has one)."""
        try:
            r = self.client.list_objects_v2(Bucket=self.s.bucket, Prefix=self.prefix, MaxKeys=1)
        except Exception as e:
            raise self._translate(e, "list", self.prefix) from e
        date = r.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        return email.utils.parsedate_to_datetime(date).timestamp() if date else None

    def get(self, key: str, limit: int | None = None) -> bytes:
        return self.get_versioned(key, limit)[0]

    def modified(self, key: str) -> float | None:
        try:
            r = self.client.head_object(Bucket=self.s.bucket, Key=self._key(key))
            return float(r["LastModified"].timestamp())
        except Exception as e:
            err = self._translate(e, "head", key)
            if isinstance(err, BlobNotFound):
                return None
            raise err from e

    def get_versioned(self, key: str, limit: int | None = None) -> tuple[bytes, str]:
        try:
            r = self.client.get_object(Bucket=self.s.bucket, Key=self._key(key))
            if limit is not None and int(r.get("ContentLength", 0)) > limit:
                r["Body"].close()
                raise too_large(key, int(r["ContentLength"]), limit)
            return _read_capped(r["Body"], key, limit), str(r["ETag"])
        except BlobTooLarge:
            raise
        except Exception as e:
            raise self._translate(e, "get", key) from e

    def get_into(
        self, key: str, buffer: Callable[[int], bytearray], limit: int | None = None
    ) -> bytes | memoryview:
        """The body read straight from the socket into the caller's buffer: no fresh 4 MiB
        bytes per pack (with the daemon's malloc tuning each was a new mmap, faulted in page
        by page), no copy out of it."""
        try:
            r = self.client.get_object(Bucket=self.s.bucket, Key=self._key(key))
            body = r["Body"]
            if "ContentLength" not in r:  # no length said (chunked): read as `get` does
                return _read_capped(body, key, limit)
            size = int(r["ContentLength"])
            if limit is not None and size > limit:
                body.close()
                raise too_large(key, size, limit)
            view = memoryview(buffer(size))[:size]
            try:
                got = _read_body_into(body, view)
            except (OSError, http.client.HTTPException) as e:  # what urllib3 would wrap
                body.close()
                raise TransientStorageError(
                    f"S3 get of {key} in {self.describe()}: reading the body failed ({e!r})"
                ) from e
            if got != size:
                body.close()
                raise TransientStorageError(
                    f"S3 get of {key} in {self.describe()}: the body ended after {got} of "
                    f"{size} bytes"
                )
            return view
        except BlobTooLarge:
            raise
        except Exception as e:
            raise self._translate(e, "get", key) from e

    def get_range(self, key: str, offset: int, length: int) -> tuple[bytes, int]:
        if length <= 0:
            return b"", self._size(key)
        try:
            r = self.client.get_object(
                Bucket=self.s.bucket,
                Key=self._key(key),
                Range=f"bytes={offset}-{offset + length - 1}",
            )
            data = bytes(r["Body"].read())
            total = str(r.get("ContentRange", "")).rpartition("/")[2]
        except Exception as e:
            err = self._translate(e, "get", key)
            if "InvalidRange" not in str(e):
                raise err from e
            return b"", self._size(key)  # from past the end: nothing, as a file would
        return data, int(total) if total.isdigit() else offset + len(data)

    def _size(self, key: str) -> int:
        try:
            return int(
                self.client.head_object(Bucket=self.s.bucket, Key=self._key(key))["ContentLength"]
            )
        except Exception as e:
            raise self._translate(e, "head", key) from e

    def put_if(self, key: str, data: bytes | memoryview, match: str | None) -> str:
        args: dict[str, Any] = {
            "Bucket": self.s.bucket,
            "Key": self._key(key),
            "Body": bytes(data),
            **self._extra(),
        }
        if match is None:
            args["IfNoneMatch"] = "*"
        else:
            args["IfMatch"] = match
        try:
            return str(self.client.put_object(**args)["ETag"])
        except Exception as e:
            if isinstance(e, bex.ClientError) and (
                e.response.get("Error", {}).get("Code") == "NotImplemented"
                or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 501
            ):  # Backblaze B2: a refusal of the headers, not an outage to retry
                raise ConditionalWritesUnsupported(
                    f"{self.describe()}: this store does not support conditional writes (it "
                    "answered 501 NotImplemented to If-Match / If-None-Match): it cannot keep "
                    "leases; run this host without fleet, or use a store that supports them "
                    "(AWS S3, MinIO, Ceph RGW, Cloudflare R2)"
                ) from e
            err = self._translate(e, "conditional put", key)
            if isinstance(err, BlobExists | BlobNotFound):
                # 412 (changed, or exists), or 404 (If-Match on a key that is gone)
                raise PreconditionFailed(f"{key} changed since it was read") from e
            raise err from e

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.s.bucket, Key=self._key(key))
            return True
        except Exception as e:
            err = self._translate(e, "exists", key)
            if isinstance(err, BlobNotFound):
                return False
            raise err from e

    def list(self, prefix: str) -> Iterator[str]:
        return iter([key for key, _ in self.list_versions(prefix)])

    def list_versions(self, prefix: str) -> Iterator[tuple[str, str]]:
        """Keys with their ETags from ListObjectsV2 (the same ETag a GET or a conditional put
        returns for a blob written in one request, as leases and heartbeats are)."""
        try:
            found = []
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.s.bucket, Prefix=self._key(prefix)
            )
            for page in pages:
                found += [
                    (o["Key"][len(self.prefix) :], str(o["ETag"])) for o in page.get("Contents", [])
                ]
        except Exception as e:
            raise self._translate(e, "list", prefix) from e
        return iter(found)

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.s.bucket, Key=self._key(key))
        except Exception as e:
            err = self._translate(e, "delete", key)
            if not isinstance(err, BlobNotFound):
                raise err from e

    def abort_incomplete_uploads(self) -> int:
        """Abort multipart uploads under our prefix that a killed process left behind."""
        n = 0
        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.s.bucket, Prefix=self.prefix
            )
            for page in pages:
                for u in page.get("Uploads", []):
                    self.client.abort_multipart_upload(
                        Bucket=self.s.bucket, Key=u["Key"], UploadId=u["UploadId"]
                    )
                    n += 1
        except Exception as e:
            raise self._translate(e, "abort-multipart", self.prefix) from e
        return n

    def _translate(self, e: Exception, op: str, key: str) -> StorageError:
        where = f"S3 {op} of {key} in {self.describe()}"
        if isinstance(e, StorageError):
            return e
        if isinstance(e, bex.NoCredentialsError | bex.PartialCredentialsError):
            return StorageAccessError(
                f"{where}: no AWS credentials found; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, a profile (storage.s3.profile), or an instance role"
            )
        if isinstance(e, bex.ProfileNotFound):
            return StorageAccessError(f"{where}: {e}; fix storage.s3.profile")
        if isinstance(e, _NETWORK_ERRORS):
            return TransientStorageError(f"{where}: cannot reach the endpoint ({e})")
        if isinstance(e, bex.ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            msg = err.get("Message") or code
            if code in ("NoSuchKey", "404", "NotFound") and op != "list":
                return BlobNotFound(f"{where}: not found")
            if code == "NoSuchBucket":
                return StorageAccessError(
                    f"bucket {self.s.bucket!r} does not exist at "
                    f"{self.s.endpoint_url or 'AWS'}: create it, or fix storage.s3.bucket"
                )
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return BlobExists(f"{where}: the key exists already")
            if code in _ACCESS_CODES or status in (401, 403):
                return StorageAccessError(
                    f"{where}: S3 refused access ({code}: {msg}); check the credentials "
                    "(AWS_ACCESS_KEY_ID, profile) and the bucket policy"
                )
            if code in _TRANSIENT_CODES or status >= 500 or status == 429:
                return TransientStorageError(f"{where}: {code}: {msg}")
            return StorageError(f"{where}: {code}: {msg}")
        return StorageError(f"{where}: {e}")


def _read_capped(body: Any, key: str, limit: int | None) -> bytes:
    """The whole body; one whose length was not said (chunked) is refused as soon as it
    passes `limit`, never read whole into memory first."""
    if limit is None:
        return bytes(body.read())
    parts: list[bytes] = []
    total = 0
    while piece := body.read(1 << 20):
        total += len(piece)
        if total > limit:
            body.close()
            raise too_large(key, None, limit)
        parts.append(piece)
    return b"".join(parts)


def _read_body_into(body: Any, view: memoryview) -> int:
    """Fill `view` from a GET's body; the bytes read (fewer: the body ended early).

    botocore's StreamingBody and urllib3 only read into fresh bytes (urllib3's `readinto`
    reads and copies), so for a plain StreamingBody this reads from the http.client response
    beneath them, which fills a buffer in place, and hands the connection back to the pool as
    urllib3 does after a whole body. A body of any other kind (a checksum-validating one) is
    read through its own `read`."""
    raw: Any = getattr(body, "_raw_stream", None)
    fp: Any = getattr(raw, "_fp", None)
    if type(body) is StreamingBody and hasattr(fp, "readinto") and hasattr(raw, "release_conn"):
        got = 0
        while got < len(view):
            n = fp.readinto(view[got:])
            if not n:
                break
            got += n
        if got == len(view) and fp.isclosed():  # http.client closes it at the body's end
            raw.release_conn()
        return got
    got = 0
    while got < len(view):
        piece = body.read(min(1 << 20, len(view) - got))
        if not piece:
            break
        view[got : got + len(piece)] = piece
        got += len(piece)
    return got
