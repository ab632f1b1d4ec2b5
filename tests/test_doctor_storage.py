"""`checkpointer doctor` checks the configured storage for real: an S3 server (moto) that checks
every request's signature, with a wrong secret, a missing bucket, and a good config (before
and after the repository exists, and with another repository's key)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest

from checkpointer.cli.doctor import Check, storage_checks
from checkpointer.config import Config, load_config
from checkpointer.repository.key import write_new_key_file
from checkpointer.repository.stack import open_repository
from tests.support import CLI, ROOT, Moto, s3_config


@dataclass
class StrictS3:
    moto: Moto
    key_id: str
    secret: str
    bucket: str


@pytest.fixture(scope="module")
def strict_s3() -> Iterator[StrictS3]:
    """moto with authentication on (after the 3 set-up calls): a user allowed everything,
    its access key, and one bucket made with it."""
    moto = Moto(env={"INITIAL_NO_AUTH_ACTION_COUNT": "3"})
    try:
        iam = boto3.client(
            "iam",
            endpoint_url=moto.url,
            region_name="us-east-1",
            aws_access_key_id="setup",
            aws_secret_access_key="setup",
        )
        iam.create_user(UserName="checkpointer")
        allow_all = {"Effect": "Allow", "Action": "*", "Resource": "*"}
        iam.put_user_policy(
            UserName="checkpointer",
            PolicyName="all",
            PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [allow_all]}),
        )
        key = iam.create_access_key(UserName="checkpointer")["AccessKey"]
        s3 = boto3.client(
            "s3",
            endpoint_url=moto.url,
            region_name="us-east-1",
            aws_access_key_id=key["AccessKeyId"],
            aws_secret_access_key=key["SecretAccessKey"],
        )
        s3.create_bucket(Bucket="doctor-bucket")
        yield StrictS3(moto, key["AccessKeyId"], key["SecretAccessKey"], "doctor-bucket")
    finally:
        moto.stop()


def config(workdir: Path, s3: StrictS3, bucket: str, name: str = "c", extra: str = "") -> Config:
    path = workdir / f"{name}.yaml"
    storage = s3_config(s3.moto, bucket).replace(
        "storage:\n", f"storage:\n  key_file: {workdir / name}.key\n", 1
    )
    path.write_text(f"state_dir: {workdir / name}-state\n{storage}{extra}")
    return load_config(path)


def run(cfg: Config, s3: StrictS3, secret: str, monkeypatch: pytest.MonkeyPatch) -> list[Check]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return storage_checks(cfg)


def line(checks: list[Check]) -> tuple[str, bool, str]:
    """The first storage line: (check, ok, detail)."""
    return checks[0].name, checks[0].ok, checks[0].detail


def test_wrong_secret_missing_bucket_and_good_config_are_three_different_lines(
    workdir: Path, strict_s3: StrictS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3 = strict_s3
    good = config(workdir, s3, s3.bucket)

    name, ok, detail = line(run(good, s3, "not-the-secret", monkeypatch))
    assert (name, ok) == ("s3 credentials", False)
    assert "SignatureDoesNotMatch" in detail, detail

    name, ok, detail = line(run(config(workdir, s3, "no-such-bucket"), s3, s3.secret, monkeypatch))
    assert (name, ok) == ("s3 bucket", False)
    assert "bucket 'no-such-bucket' does not exist" in detail, detail

    checks = run(good, s3, s3.secret, monkeypatch)
    assert [(c.name, c.ok) for c in checks] == [("s3 bucket", True), ("repository", True)]
    assert "bucket reachable, credentials accepted" in checks[0].detail
    assert "no repository at s3://doctor-bucket/ckpt" in checks[1].detail
    assert "writes its key to" in checks[1].detail
    assert not good.storage.key_file.exists()  # doctor never creates a key (nor a repository)
    listed = boto3.client(
        "s3",
        endpoint_url=s3.moto.url,
        region_name="us-east-1",
        aws_access_key_id=s3.key_id,
        aws_secret_access_key=s3.secret,
    ).list_objects_v2(Bucket=s3.bucket)
    assert listed["KeyCount"] == 0

    # The repository as the daemon creates it; then its key opens it, another key does not.
    _, spool = open_repository(good)
    assert spool is not None
    spool.close()  # its uploader would outlive the test's folder
    checks = run(good, s3, s3.secret, monkeypatch)
    assert checks[1].ok and "opened with key" in checks[1].detail, checks[1]
    other = config(workdir, s3, s3.bucket, name="other")
    write_new_key_file(workdir / "other.key")
    repo = run(other, s3, s3.secret, monkeypatch)[1]
    assert (repo.name, repo.ok) == ("repository", False), repo
    assert "s3://doctor-bucket/ckpt" in repo.detail, repo

    # The lines as the CLI prints them (the JSON the operator's scripts read), fleet mode on:
    # the conditional-write probe answers too.
    config(workdir, s3, s3.bucket, name="fleet", extra="fleet:\n  enabled: true\n")  # writes it
    (workdir / "fleet.key").write_bytes((workdir / "c.key").read_bytes())
    (workdir / "fleet.key").chmod(0o600)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": s3.key_id, "AWS_SECRET_ACCESS_KEY": s3.secret}
    r = subprocess.run(
        [*CLI, "doctor", "--config", str(workdir / "fleet.yaml"), "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    shown = {c["name"]: c for c in json.loads(r.stdout)}
    assert shown["s3 bucket"]["ok"], shown
    assert shown["conditional writes"]["ok"], shown["conditional writes"]
    assert "opened with key" in shown["repository"]["detail"], shown["repository"]
