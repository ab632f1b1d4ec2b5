"""An S3 server (moto_server, from the dev extras) on loopback, and a config that points the
daemon at it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from checkpointer.config import Config
from tests.support.net import free_port

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class Moto:
    """An S3 server (moto_server) on loopback, spoken to over HTTP like any S3 endpoint.
    Raises RuntimeError if it is missing or does not answer within 30 s."""

    def __init__(
        self, env: dict[str, str] | None = None, host: str = "127.0.0.1", netns: str = ""
    ) -> None:
        """`host`: the address to listen on (another local one, e.g. a test bridge's);
        `netns`: a named network namespace to run it in (`ip netns exec` execs, so `proc` is
        moto_server itself)."""
        self.port = free_port()
        self.url = f"http://{host}:{self.port}"
        enter = ["ip", "netns", "exec", netns] if netns else []
        self.proc = subprocess.Popen(  # what the venv's moto_server script runs
            [*enter, sys.executable, "-m", "moto.server", "-H", host, "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    code = self.proc.poll()
                    if code is None:
                        self.stop()
                    why = f"it exited with {code}" if code is not None else "no answer in 30 s"
                    raise RuntimeError(
                        f"moto_server did not start on {self.url} ({why}); the dev extras "
                        "(moto[server]) install it: `make setup`"
                    ) from None
                time.sleep(0.1)

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        return [o["Key"] for p in pages for o in p.get("Contents", [])]

    def wait_for_checkpoint(self, bucket: str, checkpoint_id: str, timeout: float = 60) -> None:
        """Until the checkpoint's manifest is in the bucket: the spool uploads in the
        background, and a test that then kills its host needs it there."""
        deadline = time.monotonic() + timeout
        while not any(k.endswith(f"/{checkpoint_id}.json") for k in self.keys(bucket, "ckpt/")):
            assert time.monotonic() < deadline, f"checkpoint {checkpoint_id} never reached S3"
            time.sleep(0.2)

    def stored_bytes(self, bucket: str, client: Any = None) -> int:
        """The total size of the bucket's objects."""
        pages = (client or self.client()).get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return sum(int(o["Size"]) for p in pages for o in p.get("Contents", []))

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def reset(self) -> None:
        """Forget every bucket and object (moto's own reset), as a new server would start."""
        request = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        urllib.request.urlopen(request, timeout=30).close()

    def stop(self) -> None:
        self.resume()
        self.proc.kill()
        self.proc.wait()


def s3_config(moto: Moto, bucket: str, extra: str = "") -> str:
    return f"""storage:
  backend: s3
  gc_grace: 1h
  retries: {{attempts: 2, max_delay: 3s}}
  s3:
    bucket: {bucket}
    prefix: ckpt
    endpoint_url: {moto.url}
    region: us-east-1
    addressing_style: path
    connect_timeout: 2s
    read_timeout: 3s
{extra}"""


def s3_repository_config(
    state: Path, key_file: Path, url: str, bucket: str, prefix: str = "ckpt"
) -> Config:
    """The config of a host whose repository is in `bucket` at `url`: what a test or bench
    that opens the daemon's storage stack itself (no daemon) needs."""
    return Config.model_validate(
        {
            "state_dir": str(state),
            "metrics": {"enabled": False},
            "storage": {
                "backend": "s3",
                "key_file": str(key_file),
                "retries": {"attempts": 2, "max_delay": "3s"},
                "s3": {
                    "bucket": bucket,
                    "prefix": prefix,
                    "endpoint_url": url,
                    "region": "us-east-1",
                    "addressing_style": "path",
                },
            },
        }
    )
