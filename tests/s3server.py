"""A real S3 endpoint for tests: moto's server mode on loopback, as s3fs's own tests use.

Requests go through real HTTP, botocore and s3fs, so retries, ETags, listings and
directory markers behave as against S3. Reusable from any test module::

    with s3_server() as s3:
        bucket = s3.create_bucket()
        storage = Storage(f"s3://{bucket}/root", s3.storage_options())

(A pytest fixture wrapping this lives in the test modules / conftest.)
"""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from moto.server import ThreadedMotoServer

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (also a port where nothing listens)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def storage_options_for(endpoint_url: str, **extra: Any) -> dict:
    """fsspec/s3fs options for an S3 endpoint with the test credentials."""
    options: dict[str, Any] = {
        "key": ACCESS_KEY,
        "secret": SECRET_KEY,
        "client_kwargs": {"endpoint_url": endpoint_url, "region_name": REGION},
    }
    options.update(extra)
    return options


@dataclass
class S3Server:
    """A running moto server: its endpoint, options to reach it, helpers to set up data."""

    server: ThreadedMotoServer
    host: str
    port: int

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def storage_options(self, **extra: Any) -> dict:
        return storage_options_for(self.endpoint_url, **extra)

    def client(self) -> Any:
        """A boto3 S3 client for this server (for setup that should not go through s3fs)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=REGION,
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name by default, so tests never share state)."""
        name = name or f"test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        self.server.stop()


def start_s3_server(host: str = "127.0.0.1", port: int = 0) -> S3Server:
    """Start moto's S3 server in a daemon thread; ``port=0`` picks a free port."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no per-request log lines
    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()
    _, bound_port = server.get_host_and_port()
    return S3Server(server=server, host=host, port=int(bound_port))


@contextmanager
def s3_server(host: str = "127.0.0.1", port: int = 0) -> Iterator[S3Server]:
    """A moto S3 server for the duration of a ``with`` block."""
    running = start_s3_server(host, port)
    try:
        yield running
    finally:
        running.stop()
