"""Restore drills: CRIU restores a checkpoint into a sandbox that cannot touch the live tree
(restore), under a PID 1 of new namespaces (init), at a priority that yields to the workloads
(priority)."""
