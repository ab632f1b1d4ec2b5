# Two commands do all set-up, idempotently: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
CONFIG ?= configs/demo.yaml

.PHONY: setup criu containers run test test-unit docs lint bench install uninstall deb

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

criu:
	@bash scripts/install-criu.sh

setup: $(STAMP) criu
	@bash scripts/install-system-deps.sh redis-server prometheus iproute2 util-linux memcached

# The daemon in the foreground, on a local-folder repository under .state/, checkpointing the
# example workload of configs/demo.yaml every 5 s. Ctrl-C stops the daemon and, for the demo
# only, its workload (in production workloads outlive the daemon).
run: setup
	$(VENV)/bin/checkpointer doctor --config $(CONFIG)
	$(VENV)/bin/checkpointer daemon --config $(CONFIG) --stop-workloads-on-exit

# LXC and Podman (runc) for the container workloads (rsync and acl: the tests judge a restored
# rootfs with `rsync -aHAX` and give files ACLs with setfacl), and the tests' container rootfs (built
# once with debootstrap, then cached in /var/cache/checkpointer-tests).
containers:
	@bash scripts/install-system-deps.sh lxc podman runc debootstrap netavark rsync acl \
		containernetworking-plugins catatonit fuse-overlayfs slirp4netns uidmap
	@bash scripts/build-test-rootfs.sh

# The suite runs in TEST_WORKERS processes (pytest-xdist; 0: in this one): most tests wait on
# daemons, leases and timers rather than use a core. tests/conftest.py keeps the workers apart.
TEST_WORKERS ?= 2
test: setup containers
	$(VENV)/bin/pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadgroup

# Benchmarks side by side (raw CRIU, dump+tar+zstd, restic, checkpointer): prints a table and
# writes bench/results/latest.json, then the migration downtime (bench/results/migration.json)
# a Podman container against Podman's own export/import (bench/results/containers.json),
# restores of one Redis: raw CRIU, kept, disk image after a reboot, rebuilt, lazy, rollback
# (bench/results/restore_speed.json), a restore from the bucket against plain parallel GETs
# (bucket_download.json), the daemon's memory on a 4 GB Redis (big_checkpoint.json); then the
# targets table of latest.md again, with all of them. About 40 minutes; bench/run.py --help.
bench: setup containers
	@bash scripts/install-system-deps.sh restic zstd
	$(VENV)/bin/python bench/run.py $(BENCH_ARGS)
	$(VENV)/bin/python -m bench.migration
	$(VENV)/bin/python -m bench.containers
	$(VENV)/bin/python -m bench.restore_speed
	$(VENV)/bin/python -m bench.bucket_download
	$(VENV)/bin/python -m bench.big_checkpoint
	$(VENV)/bin/python bench/run.py --report

# The unit tests alone (`pytestmark = pytest.mark.unit`): no root, no CRIU, no server; as any user.
test-unit: $(STAMP)
	$(VENV)/bin/pytest -q -m unit -n $(TEST_WORKERS)

# docs/configuration.md and docs/cli.md, written from the config model and the click commands
# (tests/test_references.py fails when they are stale).
docs: $(STAMP)
	$(VENV)/bin/python -m checkpointer.config.reference > docs/configuration.md
	$(VENV)/bin/python -m checkpointer.cli.reference > docs/cli.md

lint: $(STAMP)
	$(VENV)/bin/ruff check checkpointer storage tests bench
	$(VENV)/bin/ruff format --check checkpointer storage tests bench
	$(VENV)/bin/mypy

# Install on this server (scripts/install.sh says what goes where): PREFIX/venv with the
# dependencies from PyPI, /usr/local/bin/checkpointer, the systemd unit, and
# /etc/checkpointer/config.yaml and env from configs/ unless they exist (never overwritten; key
# files never touched). Fast when nothing changed; an upgrade restarts a running daemon, which
# re-adopts its workloads. DESTDIR installs into another root (packages, tests).
# `make uninstall` keeps /etc/checkpointer and the state folder (PURGE=config|all: see script).
PREFIX ?= /opt/checkpointer
INSTALL_VARS = PREFIX=$(PREFIX) $(foreach v,DESTDIR BINDIR UNITDIR SYSCONFDIR STATEDIR \
	BUILDDIR REBUILD PURGE,$(if $($(v)),$(v)=$($(v))))

install:
	@bash scripts/install-system-deps.sh python3-venv
	@$(INSTALL_VARS) bash scripts/install.sh install

uninstall:
	@$(INSTALL_VARS) bash scripts/install.sh uninstall

# checkpointer_VERSION_ARCH.deb (OUTDIR, default here): the same files as `make install`, for
# `apt install ./checkpointer_*.deb` (scripts/build-deb.sh).
deb:
	@bash scripts/install-system-deps.sh python3-venv
	@$(if $(BUILDDIR),BUILDDIR=$(BUILDDIR)) $(if $(OUTDIR),OUTDIR=$(OUTDIR)) \
		bash scripts/build-deb.sh
