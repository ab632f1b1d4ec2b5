"""checkpointer: periodic CRIU checkpoints of Linux process trees, restored by themselves."""

__version__ = "0.1.0"
