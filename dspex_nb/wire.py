"""What the kernel side and the workers agree on, beside the proto: environment names and addresses."""

from __future__ import annotations

LM_KWARGS_ENV = "DSPEX_LM_KWARGS"  # the worker's dspy.LM settings, as JSON (not on argv: they may hold a key)


def health_address(address: str) -> str:
    """Where a worker answers health pings: a server of its own beside the one that does the work, so that
    a worker busy with calls is never taken for a hung one."""
    return address.removesuffix(".sock") + ".health.sock"
