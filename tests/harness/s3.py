"""The S3 endpoint of a stack: moto's standalone server over HTTP, in this process (a thread)
or in a process of its own (benchmarks: its CPU is then not the client's)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3

from tests.harness.processes import free_port, inherited_env, running, wait_http

S3_KEY = "testing"
_MOTO_MAIN = """
import sys, threading
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False)
server.start()
threading.Event().wait()
"""


@dataclass
class MotoS3:
    endpoint_url: str
    access_key: str = S3_KEY
    secret_key: str = S3_KEY
    pid: int | None = None  # the server's own process, when it has one

    def client(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )

    def new_bucket(self, prefix: str = "qlora-test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def object_size(self, bucket: str, key: str) -> int:
        return int(self.client().head_object(Bucket=bucket, Key=key)["ContentLength"])

    def env(self, bucket: str) -> dict[str, str]:
        """The settings' environment variables that put a process's store in `bucket`."""
        return {
            "STORAGE_URL": f"s3://{bucket}",
            "S3_ENDPOINT_URL": self.endpoint_url,
            "S3_ACCESS_KEY_ID": self.access_key,
            "S3_SECRET_ACCESS_KEY": self.secret_key,
        }


@contextmanager
def moto_server(log: Path | None = None) -> Iterator[MotoS3]:
    """moto's server on a free loopback port: in a thread of this process, or with `log` in a
    process of its own whose output goes there."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    if log is None:
        from moto.server import ThreadedMotoServer

        # One INFO line per request would bury a failing test's own message in CI's output.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            yield MotoS3(endpoint_url=endpoint)
        finally:
            server.stop()
        return
    env = inherited_env(AWS_ACCESS_KEY_ID=S3_KEY, AWS_SECRET_ACCESS_KEY=S3_KEY)
    with running(["-c", _MOTO_MAIN, str(port)], env, log) as proc:
        wait_http(f"{endpoint}/moto-api/", proc=proc, log=log, any_status=True)
        yield MotoS3(endpoint_url=endpoint, pid=proc.pid)
