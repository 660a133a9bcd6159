"""Counts in the messages users read: "1 worker", "2 workers"."""


def count(n: int, noun: str) -> str:
    """``n`` and ``noun``, made plural (an ``s``) unless ``n`` is 1; the number with thousands separators."""
    return f"{n:,} {noun}{'s' * (n != 1)}"
