"""This host, as the daemon meets it: the children it waits for itself (children), the facts
that go into every checkpoint's metadata (info), and the allocator tuning that keeps the
daemon's memory in step with its use (malloc). Standard library only: the lazy restore's guard
imports children in a process that must start fast.
"""
