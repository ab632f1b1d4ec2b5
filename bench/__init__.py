"""Benchmarks: checkpointer side by side with raw CRIU, the seeds' dump+tar+zstd, and restic.

run.py        arguments and the loop: each workload, every method, the rounds, the restores
workloads.py  what is checkpointed: Redis, a Python bytearray
methods/      one module per way of checkpointing, behind methods.base.Method
daemon.py     the real daemon: its RSS while checkpointing, the scheduler at scale
report.py     medians, the table, the targets and their verdicts, the JSON and .md files
harness.py    paths, launching and killing trees, timing, the checkpointer worker
worker.py     one checkpointer checkpoint or restore in a process of its own
"""
