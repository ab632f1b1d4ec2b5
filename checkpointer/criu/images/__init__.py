"""Reading CRIU's image files: the statistics of a dump or restore (stats), the page map and
its pages (pagemap), the bytes at virtual addresses (memory)."""
