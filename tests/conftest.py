"""Shared fixtures: an S3 server on loopback (moto, as s3fs's own tests do), and a sandbox with no S3
credentials."""
from __future__ import annotations

import os
import socket
import uuid

import pytest

from orchestration.preflight import ASSUME_S3, S3_ENV


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1; yields its endpoint URL. Dummy credentials via env."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket; yields (s3fs filesystem, storage_options, bucket name)."""
    import s3fs

    opts = {"client_kwargs": {"endpoint_url": s3_server}, "use_listings_cache": False}
    fs = s3fs.S3FileSystem(**opts)
    bucket = f"b{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    yield fs, opts, bucket
    fs.rm(bucket, recursive=True)


@pytest.fixture
def no_s3_credentials(tmp_path, monkeypatch):
    """cwd is the tmp dir (relative default paths land there) and no AWS credentials are anywhere the
    preflight looks (orchestration/preflight.py S3_ENV; its shared-credentials file does not exist)."""
    monkeypatch.chdir(tmp_path)
    for k in (*S3_ENV, ASSUME_S3):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    return tmp_path
