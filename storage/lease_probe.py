"""Whether a store can keep leases: conditional writes enforced, one at a time and under
concurrency (fleet mode refuses the store otherwise, checkpointer/daemon/fleet.py).

Seen in the field: Backblaze B2 answers 501 to If-Match / If-None-Match; s3rver 3.7 accepts
both and overwrites anyway; SeaweedFS enforced them one request at a time but let concurrent
creates through; moto checks then sets (DESIGN.md). Each of these would let two hosts take
one lease.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
from collections.abc import Callable

from storage.backends.base import BlobStore
from storage.errors import (
    BlobExists,
    ConditionalWritesUnsupported,
    PreconditionFailed,
    StorageError,
)

log = logging.getLogger(__name__)

PROBE = "fleet-probe"
RACERS = 16
RACE_ROUNDS = 3
# A store may lose one race round (of at most RACE_ROUNDS + 1) before it is refused. Real S3
# never lets two of these writes win; a store that checks then sets, with a request's worth of work
# between (the bug SeaweedFS had), loses every round. moto checks then sets within one Python
# call: here it let two of 16 win in 1 of 450 rounds (on 2 busy cores), so one lost round is
# only logged; two refuse the store. See DESIGN.md on what moto's races prove.
RACES_LOST_ALLOWED = 1


def probe_conditional_writes(store: BlobStore) -> None:
    """Refuse a store that cannot keep leases: one that rejects conditional writes (Backblaze
    B2 answers 501), one that accepts them but does not enforce them (seen: s3rver 3.7
    overwrites on a wrong If-Match), and one that enforces them one request at a time but not
    under concurrency (check-then-set: several S3 servers had this bug). Two hosts could
    then both take one lease."""
    what = f"{store.describe()}: this store does not support conditional writes as leases need them"
    _one_at_a_time(store, what)
    lost: list[str] = []
    rounds = 0
    while rounds - len(lost) < RACE_ROUNDS:
        rounds += 1
        problem = _race(store, what, rounds)
        if problem is None:
            continue
        lost.append(problem)
        if len(lost) > RACES_LOST_ALLOWED:
            raise ConditionalWritesUnsupported(problem)
        log.warning("conditional-write probe: %s (once: probing on)", problem)


def _one_at_a_time(store: BlobStore, what: str) -> None:
    try:
        try:
            version = store.put_if(PROBE, b"probe", None)
        except PreconditionFailed:
            _, version = store.get_versioned(PROBE)
        else:
            try:
                store.put_if(PROBE, b"again", None)
            except PreconditionFailed:
                pass
            else:
                raise ConditionalWritesUnsupported(
                    f"{what}: it overwrote an existing object on a create-only put "
                    "(If-None-Match: *); run this host without fleet"
                )
        try:
            store.put_if(PROBE, b"wrong", '"0000000000000000000000000000000"')
        except PreconditionFailed:
            pass
        else:
            raise ConditionalWritesUnsupported(
                f"{what}: it accepted a put with a wrong If-Match; run this host without fleet"
            )
        store.put_if(PROBE, b"probe", version)
    except PreconditionFailed:
        pass  # another host probed at the same moment: it was enforced
    except BlobExists as e:
        raise ConditionalWritesUnsupported(f"{what} ({e})") from e


def _race(store: BlobStore, what: str, round_: int) -> str | None:
    """RACERS threads race a create-only put of a fresh key, then an If-Match replace of the
    version they all read: exactly one must win each race; what went wrong if not. A key of
    its own per round, so that hosts probing at once do not race each other."""
    key = f"{PROBE}-{secrets.token_hex(8)}"
    try:
        created = _winners(lambda i: store.put_if(key, b"create %d" % i, None))
        if len(created) != 1:
            return (
                f"{what}: it let {len(created)} of {RACERS} concurrent create-only puts "
                f"(If-None-Match: *) of one key succeed (round {round_}): it is not atomic "
                "under concurrency; run this host without fleet"
            )
        version = created[0]
        replaced = _winners(lambda i: store.put_if(key, b"replace %d" % i, version))
        if len(replaced) != 1:
            return (
                f"{what}: it let {len(replaced)} of {RACERS} concurrent replaces of one "
                f"version (If-Match) succeed (round {round_}): it is not atomic under "
                "concurrency; run this host without fleet"
            )
        return None
    finally:
        with contextlib.suppress(StorageError):
            store.delete(key)


def _winners(write: Callable[[int], str]) -> list[str]:
    """Run `write(i)` on RACERS threads released at once; the versions of those that won.
    Any answer but a win or PreconditionFailed is raised."""
    start = threading.Barrier(RACERS)
    won: list[str] = []
    errors: list[BaseException] = []

    def race(i: int) -> None:
        try:
            start.wait(30)
            won.append(write(i))
        except PreconditionFailed:
            pass
        except BaseException as e:  # raised in the caller's thread below
            errors.append(e)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(RACERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    return won
