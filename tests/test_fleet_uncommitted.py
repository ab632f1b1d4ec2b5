"""A failover finds only what the head names (docs/fleet.md R4): an owner stopped after its
spool uploaded a checkpoint's manifest and before it wrote the head (the commit point) has
committed nothing, and the host that finds it dead takes nothing over and says why.

The hold on A's head write is an iptables rule in A's network namespace that drops the TCP
segments of a `PUT` of `heads/web` (the string match): the manifest goes up, the head does not.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.support import Network
from tests.test_fleet import until
from tests.test_fleet_faults import serving

HEAD_PUT = [
    *("-p", "tcp", "-m", "string", "--string", "PUT /", "--algo", "bm", "--to", "80"),
    *("-m", "string", "--string", "heads/web", "--algo", "bm", "-j", "DROP"),
]


def test_an_owner_stopped_before_its_head_write_leaves_nothing_to_take_over(
    workdir: Path,
) -> None:
    with Network(workdir) as net:
        bucket, a, b = serving(net, 18098)
        a.run("iptables", "-I", "OUTPUT", *HEAD_PUT).check_returncode()
        cid = a.checkpoint("web")
        net.moto.wait_for_checkpoint(bucket, cid)  # the manifest is in the bucket
        assert a.proc is not None
        os.kill(a.proc.pid, signal.SIGSTOP)
        try:
            a.run("iptables", "-D", "OUTPUT", *HEAD_PUT).check_returncode()
            until(
                "B looks at web",
                lambda: "cannot take over web" in b.log.read_text(),
                40,
                b,
            )
            time.sleep(1)
            log = b.log.read_text()
            assert "holds no committed checkpoint of it (its head names none" in log, log[-3000:]
            listed = b.cli("list", "web", "--json", check=False)
            assert cid not in listed.stdout, listed.stdout
            assert not b.connects(18098)
        finally:
            os.kill(a.proc.pid, signal.SIGCONT)
