"""Lazy restore: the tree runs as soon as CRIU has rebuilt it; its memory follows on demand.

`criu restore --lazy-pages` leaves the pages CRIU marked LAZY (private anonymous memory, but
not the page under a thread's stack pointer: vma_entry_can_be_lazy and generate_iovs in
criu/mem.c) unmapped and registered with userfaultfd. A `criu lazy-pages` daemon receives the
userfaultfds, and fetches each missing page, on fault or in the background, from a page
server. Here the page server is ours: it answers CRIU's GET requests from a `PageSource`
(the repository, fetching and verifying the chunks of `pages-N.img`), so a restore no longer
waits for every page to be downloaded. Measured on a 200 MB workload: the tree ran 0.12 s
after the start, against 0.3 to 0.9 s for a full restore from local disk, before any fetch.

By job: preparation (the restore folder and the index of lazy pages), page_server (CRIU's
protocol), pages_daemon (the `criu lazy-pages` process), guard_process (the guard that
outlives the daemon and learns the tree before it runs), restore (`LazyRestore`, which runs
them together and watches them). Following and killing the restored tree is
restored_tree (with tree_cgroup), shared with the guard (guard, holding the
userfaultfds with uffd_hold).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from checkpointer import lazy_exports

if TYPE_CHECKING:
    from checkpointer.criu.lazy.page_server import TransferStats
    from checkpointer.criu.lazy.preparation import (
        FolderPageSource,
        LazyRange,
        PageIndex,
        PageSource,
        prepare_restore_dir,
    )
    from checkpointer.criu.lazy.restore import LazyRestore

_WHERE = {
    "TransferStats": "checkpointer.criu.lazy.page_server",
    "FolderPageSource": "checkpointer.criu.lazy.preparation",
    "LazyRange": "checkpointer.criu.lazy.preparation",
    "PageIndex": "checkpointer.criu.lazy.preparation",
    "PageSource": "checkpointer.criu.lazy.preparation",
    "prepare_restore_dir": "checkpointer.criu.lazy.preparation",
    "LazyRestore": "checkpointer.criu.lazy.restore",
}

__getattr__ = lazy_exports(__name__, _WHERE)  # names load on first use


__all__ = [
    "FolderPageSource",
    "LazyRange",
    "LazyRestore",
    "PageIndex",
    "PageSource",
    "TransferStats",
    "prepare_restore_dir",
]
