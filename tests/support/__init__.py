"""Helpers shared by the tests and the benchmarks (bench/): ports, HTTP, Redis, an S3 server,
process trees, the daemon driven through the real CLI. The fixtures stay in tests/conftest.py.

    from tests.support import Daemon, free_port, http_get
"""

from tests.support import leftovers
from tests.support.daemon import Daemon
from tests.support.host import require_root_and_criu
from tests.support.hosts import Host, Network
from tests.support.moto_server import S3_ENV, Moto, s3_config, s3_repository_config
from tests.support.net import free_port, http_get, serve
from tests.support.paths import CLI, COUNTER, PROGRAMS, ROOT
from tests.support.processes import counter_started_elsewhere, kill_tree, start_time, tree_pids
from tests.support.redis_server import redis_client, redis_command

__all__ = [
    "CLI",
    "COUNTER",
    "PROGRAMS",
    "ROOT",
    "S3_ENV",
    "Daemon",
    "Host",
    "Moto",
    "Network",
    "counter_started_elsewhere",
    "free_port",
    "http_get",
    "kill_tree",
    "leftovers",
    "redis_client",
    "redis_command",
    "require_root_and_criu",
    "s3_config",
    "s3_repository_config",
    "serve",
    "start_time",
    "tree_pids",
]
