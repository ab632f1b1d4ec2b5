"""The CPU a checkpoint needs: CRIU's cpuinfo image dumped and checked (info), and CRIU's
check replayed against another host's features without running CRIU there (fit)."""
