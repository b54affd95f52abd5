"""Sizes rounded up to a power of two: the buckets and padding classes that keep the shapes a
step runs (and the choices tuned for them) few."""


def ceil_pow2(n: int) -> int:
    """The smallest power of two ≥ ``n`` (1 for ``n`` ≤ 1)."""
    return 1 << max(n - 1, 0).bit_length()
