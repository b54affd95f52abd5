"""A target is met only beyond the measured spread, missed only beyond it the other way."""

import pytest

from flora.bench.verdict import verdict


@pytest.mark.parametrize(
    ("ratio", "spread", "target", "expected"),
    [
        (1.30, 0.05, 1.2, "met"),  # 1.30 − 0.065 ≥ 1.2
        (1.25, 0.05, 1.2, "within noise"),  # the band reaches below the target
        (1.02, 0.05, 1.0, "within noise"),  # issue 18: "1.02× — met" inside ±5%
        (0.90, 0.05, 1.0, "missed"),  # 0.90 + 0.045 < 1.0
        (1.00, 0.00, 1.0, "met"),  # no noise: exactly on target counts
    ],
)
def test_verdict(ratio, spread, target, expected):
    assert verdict(ratio, spread, target) == expected
