"""CPU compatibility: every checkpoint records the CPU it was taken on (`criu cpuinfo dump`),
and a host checks it (`criu cpuinfo check`) before a workload moves there.

The CPU that lacks something is faked the way an operator would: CRIU's `crit` decodes a real
`cpuinfo.img`, a feature bit this CPU lacks is set, `crit` encodes it again. crit is built from
the CRIU source tree scripts/install-criu.sh leaves (its protobuf modules generated here)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from checkpointer.criu import Criu, cpuinfo_check, cpuinfo_dump
from checkpointer.criu.cpu.info import CPUINFO_IMAGE, read_cpuinfo
from tests.support import COUNTER, Network, s3_config
from tests.support.hosts import Host
from tests.test_fleet import FLEET, fleet, until

CRIU_SRC = Path(os.environ.get("CRIU_BUILD_ROOT", "/var/cache/checkpointer/criu-build"))
CRIU = shutil.which("criu") or "/usr/local/sbin/criu"
# Features CRIU's default check covers (its instruction mask: criu/arch/x86/cpu.c), as
# (capability word, bit, name): one this CPU lacks is set in the fake image.
CANDIDATES = [(1, 31, "3dnow"), (1, 30, "3dnowext"), (18, 2, "avx512_4vnniw"), (1, 27, "rdtscp")]


def build_crit(into: Path) -> Path:
    """A runnable crit (pycriu + crit packages) in `into`, from the CRIU source tree that
    `make setup` (scripts/install-criu.sh) keeps; fails the test, saying so, without it."""
    src = next(iter(sorted(CRIU_SRC.glob("criu-*/crit/crit"))), None)
    if src is None or shutil.which("protoc") is None:
        pytest.fail(
            f"no CRIU source tree under {CRIU_SRC} or no protoc: run `make setup` "
            "(scripts/install-criu.sh builds CRIU there and installs protobuf-compiler)",
            pytrace=False,
        )
    tree = src.parent.parent
    shutil.copytree(tree / "lib/pycriu", into / "pycriu")
    shutil.copytree(src, into / "crit")
    protos = sorted(str(p) for p in (tree / "images").glob("*.proto") if p.name != "rpc.proto")
    images = into / "pycriu/images"
    subprocess.run(
        ["protoc", f"-I={tree / 'images'}", "-I=/usr/include", f"--python_out={images}", *protos],
        check=True,
    )
    subprocess.run(
        ["protoc", f"-I={tree / 'images'}", f"--python_out={into / 'pycriu'}", "rpc.proto"],
        cwd=tree / "images",
        check=True,
    )
    subprocess.run(
        ["/usr/bin/python3", "scripts/magic-gen.py", "criu/include/magic.h", images / "magic.py"],
        cwd=tree,
        check=True,
    )
    mods = sorted(p.stem for p in images.glob("*_pb2.py") if p.stem != "opts_pb2")
    (images / "pb.py").write_text("".join(f"from .{m} import *\n" for m in mods))
    for pkg in ("pycriu", "crit"):
        (into / pkg / "version.py").write_text("__version__ = '4.2.1'\n")
    return into


def crit(tools: Path, *args: str) -> None:
    # /usr/bin/python3: Debian's python3-protobuf (a build dependency of CRIU) is there
    subprocess.run(["/usr/bin/python3", "-m", "crit", *args], cwd=tools, check=True)


def fake_cpu(tools: Path, real: Path, out: Path) -> str:
    """`out`/cpuinfo.img: `real` with one feature this CPU lacks; returns its name."""
    have = read_cpuinfo(real / CPUINFO_IMAGE).capability
    word, bit, name = next(c for c in CANDIDATES if not have[c[0]] >> c[1] & 1)
    out.mkdir(parents=True, exist_ok=True)
    decoded = out / "cpuinfo.json"
    crit(tools, "decode", "-i", str(real / CPUINFO_IMAGE), "-o", str(decoded))
    doc = json.loads(decoded.read_text())
    doc["entries"][0]["x86_entry"][0]["capability"][word] |= 1 << bit
    decoded.write_text(json.dumps(doc))
    crit(tools, "encode", "-i", str(decoded), "-o", str(out / CPUINFO_IMAGE))
    decoded.unlink()
    return name


def test_cpuinfo_check_names_the_feature_this_cpu_lacks(workdir: Path) -> None:
    criu = Criu(CRIU, workdir / "failed")
    real = workdir / "real"
    real.mkdir()
    cpuinfo_dump(criu, real)
    assert cpuinfo_check(criu, real) == cpuinfo_check(criu, real)  # stable
    ok = cpuinfo_check(criu, real)
    assert ok is not None and ok.compatible
    missing = fake_cpu(build_crit(workdir / "tools"), real, workdir / "fake")
    bad = cpuinfo_check(criu, workdir / "fake")
    assert bad is not None and not bad.compatible
    assert bad.missing == (missing,) and missing in bad.summary(), bad
    assert cpuinfo_check(criu, workdir / "tools") is None  # records no CPU: nothing to check


def test_migrate_to_a_host_whose_cpu_lacks_a_feature_is_refused_before_anything_stops(
    workdir: Path,
) -> None:
    """A's checkpoints claim a feature this CPU lacks (its criu writes the faked cpuinfo.img),
    so B, which fetches the newest ahead, refuses it: migrate fails naming the feature and
    both hosts, and the counter runs on on A with its count."""
    port = 18090
    with counter_on_a_claiming_more(workdir, port, False, 5) as (a, b, missing, _):
        a.checkpoint("web")
        r = a.cli("migrate", "web", "--to", "b", check=False)
        assert r.returncode != 0, r.stdout
        line = r.stderr.strip().splitlines()[-1]
        assert missing in line and "host b" in line and "host a" in line, r.stderr
        assert a.status("web")["state"] == "running"
        assert a.serve(port, 1) == "6"  # never stopped: its count goes on, on A
        assert not b.connects(port)


def test_failover_to_a_host_whose_cpu_lacks_a_feature_stands_by_and_counts_it(
    workdir: Path,
) -> None:
    """A dies; B, the only other host, has failover on but its CPU lacks a feature A's
    checkpoints record: B does not claim or restore it, says why in one line, and counts it
    (checkpointer_cpu_incompatible_total, which the alert watches)."""
    port = 18091
    with counter_on_a_claiming_more(workdir, port, True, 3) as (a, b, missing, uploaded):
        uploaded(a.checkpoint("web"))
        a.kill9()  # host A dies, daemon and workloads
        until("B refuses web", lambda: "leaving it to another host" in b.log.read_text(), 40, b)
        line = next(ln for ln in b.log.read_text().splitlines() if "leaving it to" in ln)
        assert missing in line and "host b" in line and "host a" in line, line
        metrics = b.http_get(b.metrics_port, path="/metrics")
        assert 'checkpointer_cpu_incompatible_total{workload="web"} 1.0' in metrics, metrics
        time.sleep(3)  # later scans do not fetch it again, nor take it
        assert not b.connects(port)
        assert b.log.read_text().count("leaving it to another host") == 1
        r = b.cli("restore", "web", check=False)  # by hand: refused in one line too
        assert r.returncode != 0 and missing in r.stderr and "host b" in r.stderr, r.stderr
        assert not b.connects(port)


def criu_claiming_more(workdir: Path) -> tuple[Path, str]:
    """A criu whose `cpuinfo dump` records a feature this CPU lacks, and its name."""
    tools = build_crit(workdir / "tools")
    real = workdir / "real"
    real.mkdir()
    cpuinfo_dump(Criu(CRIU, workdir / "failed"), real)
    missing = fake_cpu(tools, real, workdir / "fake")
    wrapper = workdir / "criu-claims-more"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'{CRIU} "$@" || exit $?\n'
        'if [ "$1 $2" = "cpuinfo dump" ]; then\n'
        f'  cp {workdir / "fake" / CPUINFO_IMAGE} "$4/{CPUINFO_IMAGE}"\n'
        "fi\n"
    )
    wrapper.chmod(0o755)
    return wrapper, missing


@contextlib.contextmanager
def counter_on_a_claiming_more(
    workdir: Path, port: int, failover: bool, count: int
) -> Iterator[tuple[Host, Host, str, Callable[[str], None]]]:
    """Two started hosts of one fleet: A runs a criu whose checkpoints claim a feature this
    CPU lacks (its name is yielded) and the counter `web` at `count`, B this CPU's criu; and
    a wait until a checkpoint of theirs is in the bucket (the spool uploads it)."""
    wrapper, missing = criu_claiming_more(workdir)
    with Network(workdir) as net:
        bucket = net.moto.create_bucket(f"ckpt-cpu-{port}-{os.getpid()}")
        a = net.add_host(
            "a", fleet_config(net, bucket, "a", failover) + f"criu:\n  binary: {wrapper}\n"
        )
        a.start()
        b = fleet(net, bucket, "b", failover, a.key_file)
        b.start()
        a.cli("run", "web", "--every", "1h", "--", sys.executable, str(COUNTER), str(port))
        assert a.serve(port, count) == str(count)
        yield (
            a,
            b,
            missing,
            lambda checkpoint_id: net.moto.wait_for_checkpoint(bucket, checkpoint_id),
        )


def fleet_config(net: Network, bucket: str, name: str, failover: bool) -> str:
    return s3_config(net.moto, bucket) + FLEET.format(name=name, failover=str(failover).lower())
