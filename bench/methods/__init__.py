"""The ways of checkpointing the benchmark compares, one module each, behind base.Method:

raw_criu.py      CRIU alone into tmpfs: the floor for the pause and the restore
yardstick.py     one core's BLAKE3 + zstd pass over the raw images: the throughput yardstick
seeds.py         the seeds' way: dump to disk, tar + zstd, copy to a store
restic.py        restic of the image folder, local folder or S3
checkpointer.py  checkpointer's pipeline (bench/worker.py), local folder or S3
"""
