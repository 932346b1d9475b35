"""A real S3 API on 127.0.0.1 for the tests: moto's server mode (moto[server]), started once
per test module that uses conftest's `s3` fixture, with a fresh bucket per module.

The stages reach it as a user reaches S3: s3fs through fsspec, credentials and endpoint from
botocore's standard environment variables (which subprocesses, torchrun's ranks included,
inherit). Nothing leaves the machine.
"""

import contextlib
import logging
import os
import uuid
from dataclasses import dataclass

ENVIRONMENT = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
               "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
               "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"


def fresh_s3fs():
    """A new s3fs filesystem on the current environment (fsspec caches instances, and one made
    before the environment changed would keep talking to the old endpoint)."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    return s3fs.S3FileSystem()


@contextlib.contextmanager
def s3_server():
    """Start moto's S3 server on a free port of 127.0.0.1, point the AWS environment variables
    at it (dummy credentials; no profile or config file is read), create a bucket; on exit stop
    the server and restore the environment."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    saved = {name: os.environ.get(name) for name in ENVIRONMENT}
    try:
        _, port = server.get_host_and_port()
        endpoint = f"http://127.0.0.1:{port}"
        for name in ENVIRONMENT:
            os.environ.pop(name, None)
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                          AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint,
                          AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
        bucket = f"test-{uuid.uuid4().hex[:12]}"
        fresh_s3fs().mkdir(bucket)
        yield S3Server(endpoint, bucket)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
