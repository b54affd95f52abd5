"""One rule for every "target met?" line a benchmark prints: a ratio counts only beyond its noise.

A ratio of two medians carries both methods' round-to-round spread. "met" means it clears the
target by more than that spread, "missed" that it falls short by more, and anything in between
is "within noise": the run cannot tell.
"""

from __future__ import annotations


def verdict(ratio: float, spread: float, target: float) -> str:
    """``spread`` is the ratio's relative half-range (the two methods' spreads added)."""
    band = ratio * spread
    if ratio - band >= target:
        return "met"
    if ratio + band < target:
        return "missed"
    return "within noise"
