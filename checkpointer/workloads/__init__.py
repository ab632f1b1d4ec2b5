"""Process trees: launching them in their own PID namespace, adopting, watching, tearing down.

Only this package (and the CRIU driver) touches PIDs, namespaces and signals.
"""
