"""Object storage through fsspec URLs (s3://, gs://, ...): one clear line when it cannot be
reached, instead of a botocore or aiohttp traceback.

Credentials and endpoint come from where fsspec's filesystem looks (for s3fs: botocore's
environment variables AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE, AWS_ENDPOINT_URL
or AWS_ENDPOINT_URL_S3, and fsspec's own FSSPEC_S3_* options); the pipeline passes none
itself (docs/scaling-out.md). Errors are translated only once an operation has failed, so the
happy path costs no extra request.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import fsspec

from pipeline.errors import UserError


def is_remote(path: object) -> bool:
    """True for an fsspec URL other than a local file (file://)."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


@contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """Re-raise an unreachable endpoint, a missing bucket, missing credentials or a refused
    access met while working on `url` as one UserError naming it and what to check."""
    try:
        yield
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 (classified below, re-raised as it is if not)
        problem = storage_problem(url, error) if is_remote(url) else None
        if problem is None:
            raise
        raise UserError(problem) from None


def storage_problem(url: str, error: BaseException) -> str | None:
    """The line for `error` met on `url`, or None when it is not an object-storage problem."""
    names = {cls.__name__ for cls in type(error).__mro__}
    text = str(error)
    where = f"the object store at {endpoint(url)}"
    if names & {"EndpointConnectionError", "ConnectionError", "ClientConnectorError",
                "ConnectTimeoutError", "ServerDisconnectedError"} or (
            "Could not connect" in text):
        return (f"{url}: cannot connect to {where}; check AWS_ENDPOINT_URL (or the URL's "
                "endpoint_url option) and that the server is running")
    if "NoCredentialsError" in names or "Unable to locate credentials" in text:
        return (f"{url}: no credentials for {where}; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")
    if "bucket does not exist" in text or "NoSuchBucket" in text:
        return (f"{url}: bucket {_bucket(url)!r} does not exist at {where}; create it or "
                "fix the URL")
    if isinstance(error, PermissionError) or "AccessDenied" in text or (
            "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text):
        return (f"{url}: access refused by {where} ({text.splitlines()[0][:120]}); check "
                "the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE)")
    return None


def endpoint(url: str) -> str:
    """The endpoint a URL's filesystem talks to, as far as it can be told without a request."""
    try:
        fs = fsspec.core.url_to_fs(url)[0]
    except Exception:  # noqa: BLE001 (an unknown protocol: nothing more to say)
        return "its default endpoint"
    configured = getattr(fs, "endpoint_url", None) or (
        getattr(fs, "client_kwargs", None) or {}).get("endpoint_url")
    from_env = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if configured or (from_env and url.startswith(("s3://", "s3a://"))):
        return str(configured or from_env)
    return "its default endpoint"


def _bucket(url: str) -> str:
    return url.split("://", 1)[1].split("/", 1)[0]
