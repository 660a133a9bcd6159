"""Client side of the pool, in the kernel process: worker processes and their supervision."""
